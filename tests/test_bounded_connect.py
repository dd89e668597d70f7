"""Every connect timeout kept against a silent endpoint: a socket that accepts the
connection and never answers (a frozen learner, some other server). TCPStore's own
check of a new connection waits for it without a limit; weight-sync's connects give
up at their timeout with a typed error (issue 24, P2)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest
from versioned import make_weights

from weight_sync import ConnectionInfo, WeightReceiver
from weight_sync.control.discovery import ADDR_VAR, info_from_address, info_from_env
from weight_sync.errors import ConnectionFailed

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
