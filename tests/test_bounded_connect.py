"""Every connect timeout kept against a silent endpoint: a socket that accepts the
connection and never answers (a frozen learner, some other server). TCPStore's own
check of a new connection waits for it without a limit, and so does any store call to
a learner frozen after it answered the connection; weight-sync's connects give up at
their timeout with a typed error (issue 24, P2)."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection

import pytest
from harness import Cluster
from versioned import RX_TIMEOUT_S, expected, fingerprint, make_weights

from weight_sync import ConnectionInfo, WeightReceiver, WeightSender, WeightSyncError
from weight_sync.control.channel import Control
from weight_sync.control.discovery import ADDR_VAR, info_from_address, info_from_env
from weight_sync.errors import ConnectionFailed, PeerGone

pytestmark = pytest.mark.timeout(120)

TIMEOUT_S = 3.0
BOUND_S = 4.0  # issue 24: connect(timeout=3) raises within ~4 s


@pytest.fixture(scope="session")
def silent() -> Iterator[int]:
    """A port whose listener accepts every connection and never answers, for the whole
    session: a connect attempt the library gave up on stays parked on it (TCPStore's
    check cannot be interrupted) and retries; were the port freed, it could reach
    whatever a later test binds there (a store, a gloo pair) and disturb it."""
    server = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                return
            held.append(conn)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        server.close()
        thread.join(5)
        for conn in held:
            conn.close()


def _timed(call: object) -> tuple[BaseException | None, float]:
    start = time.monotonic()
    try:
        call()  # type: ignore[operator]
    except BaseException as exc:
        return exc, time.monotonic() - start
    return None, time.monotonic() - start


def test_receiver_connect_keeps_its_timeout(silent: int) -> None:
    info = ConnectionInfo(host="127.0.0.1", port=silent, name="policy", num_collectors=1)
    rx = WeightReceiver(make_weights(0), info, 0)
    try:
        error, took = _timed(lambda: rx.connect(timeout=TIMEOUT_S))
    finally:
        rx.close()
    assert isinstance(error, ConnectionFailed), repr(error)
    assert "did not answer" in str(error) and str(silent) in str(error)
    assert took < BOUND_S, f"connect(timeout={TIMEOUT_S}) took {took:.1f}s"


def test_discovery_keeps_its_timeout(silent: int) -> None:
    for call in (lambda: info_from_address("127.0.0.1", silent, timeout=TIMEOUT_S),
                 lambda: info_from_env({ADDR_VAR: f"127.0.0.1:{silent}"}, timeout=TIMEOUT_S)):
        error, took = _timed(call)
        assert isinstance(error, ConnectionFailed), repr(error)
        assert took < BOUND_S, f"took {took:.1f}s with timeout={TIMEOUT_S}"


def reporting_learner(out: Connection, go: Connection) -> None:
    """A learner of one collector that reports how its ``connect()`` ended, then waits
    for collector 0 to be served (again) and reports the version it is at."""
    sender = WeightSender(make_weights(0), 1, timeout=RX_TIMEOUT_S)
    out.send(("info", sender.connection_info, os.getpid()))
    try:
        sender.connect(timeout=60)
        out.send(("connect", "ok", ""))
    except WeightSyncError as exc:
        out.send(("connect", type(exc).__name__, str(exc)))
    sender.wait_for([0], timeout=60)
    out.send(("served", sender.current_version(0), os.getpid()))
    go.poll(600)  # parked: the test kills this process


def test_a_learner_frozen_during_the_join_keeps_the_timeout(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The learner (a real process) answers the connection, then freezes (SIGSTOP) before
    the collector's first store call of the join: a store call to it answers only when
    it wakes, whatever the client's timeout. ``connect(timeout=3)`` still raises
    ``PeerGone`` within its bound; once the learner wakes, the abandoned join tells it
    this collector left (no wait for its liveness timeout), and the id joins again."""
    cluster = Cluster(learner=reporting_learner)
    try:
        _frozen_mid_join(cluster, monkeypatch)
    finally:
        cluster.shutdown()


def _frozen_mid_join(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    learner, _ = cluster.start_learner()
    info = cluster.take(lambda m: m[0] == "info", 90, "the learner's info")[1]
    assert learner.pid is not None
    real_join = Control.join
    frozen: list[float] = []

    def freeze_then_join(self: Control, cid: int) -> int:
        if not frozen:
            os.kill(learner.pid, signal.SIGSTOP)  # type: ignore[arg-type]
            frozen.append(time.monotonic())
        return real_join(self, cid)

    monkeypatch.setattr(Control, "join", freeze_then_join)
    rx = WeightReceiver(make_weights(-7), info, 0, timeout=RX_TIMEOUT_S)
    try:
        error, took = _timed(lambda: rx.connect(timeout=TIMEOUT_S))
        rx.close()
    finally:
        os.kill(learner.pid, signal.SIGCONT)
    monkeypatch.setattr(Control, "join", real_join)
    assert frozen, "the join never reached its first store call"
    assert isinstance(error, PeerGone), repr(error)
    assert "stopped answering during the join" in str(error), error
    assert took < BOUND_S, f"connect(timeout={TIMEOUT_S}) took {took:.1f}s"
    # Awake, the learner admits the join it had been asked for; the abandoned attempt
    # leaves at once: the learner's connect() names it as closed, not as silent.
    outcome = cluster.take(lambda m: m[0] == "connect", 60, "the learner's connect()")
    assert outcome[1] == "CollectorFailed" and "closed its receiver" in outcome[2], outcome
    weights = make_weights(-7)
    again = WeightReceiver(weights, info, 0, timeout=RX_TIMEOUT_S)
    try:
        assert again.connect(timeout=30) == 0
        assert fingerprint(weights) == expected(0)
        assert cluster.take(lambda m: m[0] == "served", 60, "collector 0 served")[1] == 0
    finally:
        again.close()
