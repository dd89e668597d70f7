"""Fault tests with real processes: collectors die, rejoin, stall; the learner dies;
bad input is refused with the right typed error.

The test process is the learner (except in the learner-death test, where the learner
is a child too). Collectors are spawned children driven through a command queue and
reporting every applied version, with an exact fingerprint of their weights, through a
shared result queue. Every child is killed and joined in ``finally``, and each test
checks that no child is left alive.

Weights are a pure function of the version (:func:`make_weights`), so a fingerprint
can be checked against the expected one for the version alone (bit-exact).
"""

from __future__ import annotations

import contextlib
import hashlib
import multiprocessing as mp
import os
import queue as queue_mod
import signal
import threading
import time
from typing import Any

import pytest
import torch

from weight_sync import (
    AckResult,
    ClosedError,
    CollectorFailed,
    ConnectionFailed,
    ConnectionInfo,
    DuplicateCollectorError,
    InvalidWeightsError,
    LayoutMismatchError,
    PeerGone,
    ProtocolError,
    WeightReceiver,
    WeightSender,
    WeightSyncError,
)

CTX = mp.get_context("spawn")
MARGIN_S = 15.0  # slack for a loaded 2-core machine: a hang guard, not a speed claim
RX_TIMEOUT_S = 20.0


# -- weights that are a function of the version --------------------------------------
def make_weights(version: int, *, variant: str = "base") -> dict[str, torch.Tensor]:
    i = torch.arange(128, dtype=torch.int64)
    weights = {
        "w": (((i * 31 + version * 17) % 1009).to(torch.float32) / 7).reshape(16, 8),
        "b": ((torch.arange(8) + version) % 13).to(torch.bfloat16),
        "n": torch.tensor(version, dtype=torch.int64),
    }
    if variant == "other_key":
        weights["extra"] = torch.zeros(3)
    elif variant == "other_shape":
        weights["w"] = torch.zeros(8, 16)
    elif variant == "other_dtype":
        weights["b"] = torch.zeros(8, dtype=torch.float32)
    return weights


def set_version(weights: dict[str, torch.Tensor], version: int) -> None:
    with torch.no_grad():
        for name, value in make_weights(version).items():
            weights[name].copy_(value)


def fingerprint(weights: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(weights):
        t = weights[name].detach().contiguous().reshape(-1)
        digest.update(f"{name}|{t.dtype}|{tuple(weights[name].shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def expected(version: int) -> str:
    return fingerprint(make_weights(version))


# -- children (module level: picklable by reference) ---------------------------------
def collector_main(info: ConnectionInfo, cid: int, out_q: Any, cmd_q: Any) -> None:
    """Connect, then poll; report every apply; obey pause/resume/stop."""
    torch.set_num_threads(1)
    weights = make_weights(-7)
    pid = os.getpid()
    rx = WeightReceiver(weights, info, cid, timeout=RX_TIMEOUT_S, idle_slice=0.5)
    try:
        try:
            version = rx.connect(timeout=60)
        except WeightSyncError as exc:
            out_q.put(("error", cid, type(exc).__name__, str(exc), fingerprint(weights), pid))
            return
        out_q.put(("applied", cid, version, fingerprint(weights), pid))
        paused = False
        while True:
            try:
                cmd = cmd_q.get_nowait()
            except queue_mod.Empty:
                cmd = None
            if cmd == "pause":
                paused = True
                out_q.put(("paused", cid, None, None, pid))
            elif cmd == "resume":
                paused = False
            elif cmd == "stop":
                break
            if paused:
                time.sleep(0.02)
                continue
            try:
                version = rx.receive_weights(timeout=0.05)
            except WeightSyncError as exc:
                out_q.put(("error", cid, type(exc).__name__, str(exc), fingerprint(weights),
                           pid))
                return
            if version is not None:
                out_q.put(("applied", cid, version, fingerprint(weights), pid))
    finally:
        rx.close()
        out_q.put(("exit", cid, None, None, pid))


def learner_main(out_q: Any, num_collectors: int) -> None:
    """A learner that publishes version 1, reports, then idles until it is killed."""
    torch.set_num_threads(1)
    weights = make_weights(0)
    sender = WeightSender(weights, num_collectors, timeout=RX_TIMEOUT_S)
    out_q.put(("info", sender.connection_info))
    sender.connect(timeout=60)
    set_version(weights, 1)
    sender.send_weights(timeout=30)
    out_q.put(("ready", os.getpid()))
    time.sleep(600)


# -- harness ---------------------------------------------------------------------------
class Cluster:
    """Spawned collectors plus the queue they report on."""

    def __init__(self) -> None:
        # One result queue per process: a SIGKILLed writer may die holding a shared
        # queue's write lock, which would silently wedge every other writer.
        self.queues: list[Any] = []
        self.procs: dict[int, Any] = {}
        self.cmds: dict[int, Any] = {}
        self.all_procs: list[Any] = []
        self.backlog: list[tuple[Any, ...]] = []

    def start(self, info: ConnectionInfo, cid: int) -> Any:
        cmd_q = CTX.Queue()
        proc = CTX.Process(target=collector_main, args=(info, cid, self.new_queue(), cmd_q),
                           name=f"collector-{cid}", daemon=True)
        proc.start()
        self.procs[cid], self.cmds[cid] = proc, cmd_q
        self.all_procs.append(proc)
        return proc

    def new_queue(self) -> Any:
        q = CTX.Queue()
        self.queues.append(q)
        return q

    def _pull(self) -> bool:
        got = False
        for q in self.queues:
            with contextlib.suppress(queue_mod.Empty):
                while True:
                    self.backlog.append(q.get_nowait())
                    got = True
        return got

    def start_process(self, target: Any, args: tuple[Any, ...], name: str) -> Any:
        proc = CTX.Process(target=target, args=args, name=name, daemon=True)
        proc.start()
        self.all_procs.append(proc)
        return proc

    def kill(self, cid: int) -> None:
        proc = self.procs[cid]
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(10)
        assert not proc.is_alive()

    def take(self, pred: Any, timeout: float, what: str, pump: Any = None) -> tuple[Any, ...]:
        """The first reported message matching ``pred`` (others kept for later)."""
        deadline = time.monotonic() + timeout
        while True:
            for i, msg in enumerate(self.backlog):
                if pred(msg):
                    return self.backlog.pop(i)
            if pump is not None:
                pump()
            if self._pull():
                continue
            time.sleep(0.02)
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}; "
                                     f"backlog: {self.backlog}")

    def applied(self, cid: int, version: int, timeout: float = 30.0) -> tuple[Any, ...]:
        msg = self.take(lambda m: m[0] in ("applied", "error") and m[1] == cid
                        and (m[0] == "error" or m[2] >= version), timeout,
                        f"collector {cid} to apply version {version}")
        assert msg[0] == "applied", msg
        return msg

    def applies(self, cid: int) -> list[int]:
        """Versions collector ``cid`` reported applied so far (drains the backlog)."""
        got = [m[2] for m in self.backlog if m[0] == "applied" and m[1] == cid]
        self.backlog = [m for m in self.backlog if not (m[0] == "applied" and m[1] == cid)]
        return got

    def drain(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self._pull()
            time.sleep(0.02)

    def shutdown(self) -> None:
        for proc in self.all_procs:
            if proc.is_alive():
                proc.kill()
        for proc in self.all_procs:
            proc.join(10)
        alive = [p.pid for p in self.all_procs if p.is_alive()]
        for q in [*self.queues, *self.cmds.values()]:
            q.cancel_join_thread()
            q.close()
        assert not alive, f"processes left alive: {alive}"


@pytest.fixture
def cluster() -> Any:
    c = Cluster()
    try:
        yield c
    finally:
        c.shutdown()
    assert not [p for p in CTX.active_children() if p in c.all_procs]


def connect_all(sender: WeightSender, cluster: Cluster, ids: list[int]) -> None:
    info = sender.connection_info
    for cid in ids:
        cluster.start(info, cid)
    sender.connect(timeout=90)
    for cid in ids:
        msg = cluster.applied(cid, 0)
        assert msg[2] == 0 and msg[3] == expected(0), msg


def publish(sender: WeightSender, weights: dict[str, torch.Tensor]) -> int:
    set_version(weights, sender.version + 1)
    return sender.send_weights_async()


# -- (a) (b) (c): collector death and rejoin -------------------------------------------
def test_collector_killed_idle_then_rejoins_then_killed_before_ack(cluster: Cluster) -> None:
    weights = make_weights(0)
    with WeightSender(weights, 3, timeout=RX_TIMEOUT_S) as sender:
        connect_all(sender, cluster, [0, 1, 2])

        # (a) collector 0 SIGKILLed while idle
        cluster.kill(0)
        v = publish(sender, weights)
        t_wait = 10.0
        start = time.monotonic()
        with pytest.raises(CollectorFailed) as info:
            sender.wait_ack(timeout=t_wait)
        assert time.monotonic() - start < t_wait + MARGIN_S
        err = info.value
        assert err.collector_id == 0 and "0" in str(err)
        result = err.result
        assert isinstance(result, AckResult)
        assert result.version == v and set(result.failed) == {0}
        assert result.acked == (1, 2) and result.lagging == ()
        assert 0 in sender.failed and 0 not in sender.transports
        for cid in (1, 2):
            assert cluster.applied(cid, v)[3] == expected(v)
        # the next version reaches every live collector with a plain wait_ack
        v = publish(sender, weights)
        ok = sender.wait_ack(timeout=30)
        assert ok.complete and ok.acked == (1, 2) and ok.version == v
        for cid in (1, 2):
            msg = cluster.applied(cid, v)
            assert msg[2] == v and msg[3] == expected(v)

        # (c) restart collector 0 with the same id: admitted on the learner's next calls
        cluster.start(sender.connection_info, 0)
        deadline = time.monotonic() + 90
        while 0 not in sender.transports or sender.transports[0].acked_version < v:
            assert time.monotonic() < deadline, "collector 0 was not admitted again"
            sender.wait_ack(timeout=1)
            time.sleep(0.05)
        msg = cluster.applied(0, v)
        assert msg[2] == v and msg[3] == expected(v), "rejoined collector not bit-exact"
        assert 0 not in sender.failed
        v = publish(sender, weights)
        ok = sender.wait_ack(timeout=30)
        assert ok.complete and ok.acked == (0, 1, 2)
        for cid in (0, 1, 2):
            assert cluster.applied(cid, v)[3] == expected(v)

        # (b) collector 1 receives but never applies (stops polling); killed while the
        # learner waits for its ack
        cluster.cmds[1].put("pause")
        cluster.take(lambda m: m[0] == "paused" and m[1] == 1, 30, "collector 1 to pause")
        v = publish(sender, weights)
        killer = threading.Timer(1.0, cluster.kill, args=(1,))
        t_wait = 20.0
        start = time.monotonic()
        killer.start()
        try:
            with pytest.raises(CollectorFailed) as info:
                sender.wait_ack(timeout=t_wait)
        finally:
            killer.join()
        waited = time.monotonic() - start
        assert waited < t_wait, f"dead collector cost the whole timeout ({waited:.1f}s)"
        assert info.value.collector_id == 1
        assert info.value.result.acked == (0, 2) and set(info.value.result.failed) == {1}
        v = publish(sender, weights)
        ok = sender.wait_ack(timeout=30)
        assert ok.complete and ok.acked == (0, 2)
        for cid in (0, 2):
            assert cluster.applied(cid, v)[3] == expected(v)
        for cid in (0, 2):
            cluster.cmds[cid].put("stop")
        for cid in (0, 2):
            cluster.take(lambda m, c=cid: m[0] == "exit" and m[1] == c, 30, f"{cid} to exit")


# -- (d): learner death ----------------------------------------------------------------
def test_learner_killed_collectors_get_peer_gone(cluster: Cluster) -> None:
    learner = cluster.start_process(learner_main, (cluster.new_queue(), 2), "learner")
    info = cluster.take(lambda m: m[0] == "info", 90, "the learner's info")[1]
    for cid in (0, 1):
        cluster.start(info, cid)
    cluster.take(lambda m: m[0] == "ready", 90, "the learner to publish version 1")
    for cid in (0, 1):
        assert cluster.applied(cid, 1)[3] == expected(1)
    os.kill(learner.pid, signal.SIGKILL)
    killed = time.monotonic()
    learner.join(10)
    for cid in (0, 1):
        msg = cluster.take(lambda m, c=cid: m[0] == "error" and m[1] == c,
                           RX_TIMEOUT_S + MARGIN_S, f"collector {cid} to see the learner die")
        assert msg[2] in ("PeerGone", "ConnectionFailed", "WeightSyncTimeout"), msg
        assert msg[4] == expected(1), "weights changed after the learner died"
    assert time.monotonic() - killed < RX_TIMEOUT_S + MARGIN_S
    for cid in (0, 1):
        cluster.take(lambda m, c=cid: m[0] == "exit" and m[1] == c, 30, f"{cid} to exit")
        cluster.procs[cid].join(30)
        assert cluster.procs[cid].exitcode == 0


# -- (e): slow collector ---------------------------------------------------------------
def test_slow_collector_gets_newest_not_a_queue(cluster: Cluster) -> None:
    weights = make_weights(0)
    with WeightSender(weights, 2, timeout=RX_TIMEOUT_S) as sender:
        connect_all(sender, cluster, [0, 1])
        cluster.cmds[1].put("pause")
        cluster.take(lambda m: m[0] == "paused" and m[1] == 1, 30, "collector 1 to pause")
        first = None
        for _ in range(12):
            v = publish(sender, weights)
            first = first or v
            with contextlib.suppress(WeightSyncError):
                sender.wait_ack(timeout=0.3)  # collector 1 lags: a timeout, by design
            assert cluster.applied(0, v)[3] == expected(v)
        newest = sender.version
        assert sender._pool.allocated <= 4, sender._pool.allocated
        cluster.applies(1)  # nothing applied while paused
        cluster.cmds[1].put("resume")
        ok = sender.wait_ack(timeout=30)
        assert ok.complete and ok.acked == (0, 1)
        msg = cluster.applied(1, newest)
        assert msg[2] == newest and msg[3] == expected(newest)
        cluster.drain(0.3)
        got = [*cluster.applies(1)]
        # at most the in-flight one, then the newest
        assert len(got) <= 1 and all(g in (first, newest) for g in got), got
        assert sender._pool.allocated <= 4, sender._pool.allocated
        for cid in (0, 1):
            cluster.cmds[cid].put("stop")
        for cid in (0, 1):
            cluster.take(lambda m, c=cid: m[0] == "exit" and m[1] == c, 30, f"{cid} to exit")


# -- (f): bad input (in-process: receivers in threads) ---------------------------------
def _connect_in_thread(rx: WeightReceiver, timeout: float = 30) -> dict[str, Any]:
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["version"] = rx.connect(timeout=timeout)
        except BaseException as exc:
            box["error"] = exc

    box["thread"] = threading.Thread(target=run, daemon=True)
    box["thread"].start()
    return box


@pytest.mark.parametrize("variant", ["other_key", "other_shape", "other_dtype"])
def test_layout_mismatch_both_sides_nothing_applied(variant: str) -> None:
    with WeightSender(make_weights(0), 1, timeout=20) as sender:
        theirs = make_weights(-3, variant=variant)
        before = fingerprint(theirs)
        rx = WeightReceiver(theirs, sender.connection_info, 0, timeout=20)
        box = _connect_in_thread(rx)
        with pytest.raises(LayoutMismatchError) as info:
            sender.connect(timeout=30)
        assert info.value.differences
        box["thread"].join(30)
        assert isinstance(box.get("error"), LayoutMismatchError), box
        assert fingerprint(theirs) == before
        rx.close()


def test_empty_weights_refused() -> None:
    with pytest.raises(InvalidWeightsError):
        WeightSender({}, 1)


def test_noncontiguous_params_duplicate_id_and_misuse() -> None:
    base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    learner = torch.nn.Module()
    learner.register_buffer("t", base.t())  # a non-contiguous view
    learner.register_buffer("s", base[:, ::3])
    assert not learner.t.is_contiguous()
    sender = WeightSender(learner, 1, timeout=20)
    with pytest.raises(ProtocolError):
        sender.send_weights_async()
    with pytest.raises(ProtocolError):
        sender.wait_ack(timeout=1)
    collector = torch.nn.Module()
    collector.register_buffer("t", torch.zeros(10, 6))
    collector.register_buffer("s", torch.zeros(6, 4))
    rx = WeightReceiver(collector, sender.connection_info, 0, timeout=20)
    box = _connect_in_thread(rx)
    sender.connect(timeout=30)
    box["thread"].join(30)
    assert "error" not in box, box
    assert torch.equal(collector.t, base.t()) and torch.equal(collector.s, base[:, ::3])

    # a second receiver with the same id while the first is alive
    dup = WeightReceiver({"t": torch.zeros(10, 6), "s": torch.zeros(6, 4)},
                         sender.connection_info, 0, timeout=20)
    dbox = _connect_in_thread(dup)
    deadline = time.monotonic() + 30
    while dbox["thread"].is_alive() and time.monotonic() < deadline:
        sender.wait_ack(timeout=0.5)
        time.sleep(0.05)
    assert isinstance(dbox.get("error"), DuplicateCollectorError), dbox
    assert 0 in sender.transports and not sender.failed

    # send_weights_async(weights=other layout): refused, version unchanged
    version = sender.version
    with pytest.raises(LayoutMismatchError):
        sender.send_weights_async(weights={"t": torch.zeros(3, 3)})
    assert sender.version == version
    with torch.no_grad():
        base.add_(1)
    assert sender.send_weights_async() == version + 1
    assert rx.receive_weights(timeout=10) == version + 1  # applies, then acks
    assert sender.wait_ack(timeout=30).complete
    assert torch.equal(collector.t, base.t())

    sender.close()
    with pytest.raises(ClosedError):
        sender.send_weights_async()
    with pytest.raises(ClosedError):
        sender.wait_ack(timeout=1)
    with pytest.raises((ClosedError, PeerGone)):
        rx.receive_weights(timeout=10)
    rx.close()
    dup.close()
    with pytest.raises(ClosedError):
        rx.receive_weights(timeout=0)


def test_port_in_use_and_unreachable_store() -> None:
    with WeightSender(make_weights(0), 1) as first:
        port = first.connection_info.port
        with pytest.raises(ConnectionFailed):
            WeightSender(make_weights(0), 1, port=port)
    with WeightSender(make_weights(0), 1) as gone:
        info = gone.connection_info
    # the store above is closed: nobody listens on its port any more
    rx = WeightReceiver(make_weights(0), info, 0, timeout=3)
    start = time.monotonic()
    with pytest.raises(ConnectionFailed):
        rx.connect(timeout=3)
    assert time.monotonic() - start < 3 + MARGIN_S
