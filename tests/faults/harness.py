"""What the fault tests share: weights that are a function of the version, the child
processes (collectors and learners, some of which die on purpose), and the
:class:`Cluster` that spawns, watches and always reaps them.

Children report over a one-way pipe each (``Connection.send`` is synchronous, so a
report written just before a SIGKILL is not lost, and a child killed mid-write cannot
wedge the others as a shared queue's lock could). The test process waits on all the
pipes at once with ``multiprocessing.connection.wait``: nothing here sleeps.

Weights are a pure function of the version (:func:`make_weights`), so a fingerprint
can be checked against the expected one for the version alone (bit-exact).
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import queue as queue_mod
import signal
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from typing import Any

import torch

from weight_sync import ConnectionInfo, WeightReceiver, WeightSender, WeightSyncError
from weight_sync.hooks import ReceiverHooks

CTX = mp.get_context("spawn")
MARGIN_S = 15.0  # slack for a loaded 2-core machine: a hang guard, not a speed claim
RX_TIMEOUT_S = 20.0
#: Elements of the large policy used to catch a transfer in the middle (128 MB).
BIG_NUMEL = 32 * 2**20

Msg = tuple[Any, ...]


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


def big_weights(version: int) -> dict[str, torch.Tensor]:
    """A 128 MB policy whose every element is ``version`` (last leaf included)."""
    return {"big": torch.full((BIG_NUMEL,), float(version)),
            "tail": torch.full((1024,), float(version))}


def big_version(weights: dict[str, torch.Tensor]) -> float | None:
    """The version every element of a :func:`big_weights` policy holds, else None."""
    value = float(weights["tail"][0])
    ok = all(bool((t == value).all()) for t in weights.values())
    return value if ok else None


def set_version(weights: dict[str, torch.Tensor], version: int) -> None:
    make = big_weights if "big" in weights else make_weights
    with torch.no_grad():
        for name, value in make(version).items():
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


def publish(sender: WeightSender, weights: dict[str, torch.Tensor]) -> int:
    set_version(weights, sender.version + 1)
    return sender.send_weights_async()


# -- catching a transfer in the middle -------------------------------------------------
def mid_transfer_hooks(min_version: int, action: Callable[[int, bool], None]) -> ReceiverHooks:
    """Hooks that call ``action(version, tail_unwritten)`` once a message of
    ``min_version`` or newer is partly received: its header landed in the buffer, and
    ``tail_unwritten`` tells whether its last bytes had not yet.

    A thread watches the buffer while the real receive runs (``before_receive`` starts
    it just before the transport fills the buffer).
    """
    def watch_from(version: int, buffer: torch.Tensor | None) -> None:
        if version < min_version or buffer is None:
            return
        head, tail = buffer[:64].clone(), buffer[-64:].clone()

        def watch() -> None:
            deadline = time.monotonic() + RX_TIMEOUT_S
            while time.monotonic() < deadline:
                if not torch.equal(buffer[:64], head):
                    action(version, torch.equal(buffer[-64:], tail))
                    return

        threading.Thread(target=watch, daemon=True).start()

    return ReceiverHooks(before_receive=watch_from)


# -- children (module level: picklable by reference) ---------------------------------
def collector_main(info: ConnectionInfo, cid: int, out: Connection, cmd_q: Any,
                   big: bool = False, hooks: ReceiverHooks | None = None) -> None:
    """Connect, then poll; report every apply; obey pause/resume/stop."""
    torch.set_num_threads(1)
    weights = big_weights(-7) if big else make_weights(-7)
    pid = os.getpid()

    def state() -> str | float | None:
        return big_version(weights) if big else fingerprint(weights)

    rx = WeightReceiver(weights, info, cid, timeout=RX_TIMEOUT_S, hooks=hooks)
    try:
        try:
            version = rx.connect(timeout=60)
        except WeightSyncError as exc:
            out.send(("error", cid, type(exc).__name__, str(exc), state(), pid))
            return
        out.send(("applied", cid, version, state(), pid))
        paused = False
        while True:
            try:  # while paused, block on the command queue instead of polling weights
                cmd = cmd_q.get(timeout=RX_TIMEOUT_S) if paused else cmd_q.get_nowait()
            except queue_mod.Empty:
                cmd = None
            if cmd == "pause":
                paused = True
                out.send(("paused", cid, None, None, pid))
            elif cmd == "resume":
                paused = False
            elif cmd == "stop":
                break
            if paused:
                continue
            try:
                version = rx.receive_weights(timeout=0.05)
            except WeightSyncError as exc:
                out.send(("error", cid, type(exc).__name__, str(exc), state(), pid))
                return
            if version is not None:
                out.send(("applied", cid, version, state(), pid))
    finally:
        rx.close()
        out.send(("exit", cid, None, None, pid))


def collector_dies_mid_transfer(info: ConnectionInfo, cid: int, out: Connection,
                                cmd_q: Any) -> None:
    """A big-policy collector that SIGKILLs itself halfway through receiving v1."""

    def die(version: int, tail_unwritten: bool) -> None:
        out.send(("mid", cid, version, tail_unwritten, os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)

    collector_main(info, cid, out, cmd_q, big=True, hooks=mid_transfer_hooks(1, die))


def collector_dies_in_handshake(info: ConnectionInfo, cid: int, out: Connection,
                                cmd_q: Any) -> None:
    """A collector that is admitted, then SIGKILLs itself before building its end of
    the link (the learner's rendezvous then waits for nobody)."""

    def die(collector_id: int, incarnation: int) -> None:
        out.send(("handshake", cid, incarnation, None, os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)

    collector_main(info, cid, out, cmd_q, hooks=ReceiverHooks(before_connect=die))


def collector_kills_learner_mid_transfer(info: ConnectionInfo, cid: int, out: Connection,
                                         cmd_q: Any, learner_pid: int) -> None:
    """A big-policy collector that SIGKILLs the learner halfway through receiving v1."""

    def kill_learner(version: int, tail_unwritten: bool) -> None:
        os.kill(learner_pid, signal.SIGKILL)
        out.send(("mid", cid, version, tail_unwritten, os.getpid()))

    collector_main(info, cid, out, cmd_q, big=True, hooks=mid_transfer_hooks(1, kill_learner))


def learner_main(out: Connection, go: Connection, num_collectors: int, big: bool) -> None:
    """A learner that connects, publishes version 1 when told, then waits to be killed."""
    torch.set_num_threads(1)
    weights = big_weights(0) if big else make_weights(0)
    sender = WeightSender(weights, num_collectors, timeout=RX_TIMEOUT_S)
    out.send(("info", sender.connection_info, os.getpid()))
    sender.connect(timeout=60)
    out.send(("connected", os.getpid()))
    if go.poll(60):
        go.recv()
        set_version(weights, 1)
        sender.send_weights_async()
        out.send(("published", os.getpid()))
        sender.wait_ack(timeout=RX_TIMEOUT_S)
        out.send(("acked", os.getpid()))
    go.poll(600)  # parked: the test kills this process


# -- harness ---------------------------------------------------------------------------
class Cluster:
    """Spawned children, the pipes they report on, and their reaping."""

    def __init__(self) -> None:
        self.readers: list[Connection] = []
        self.procs: dict[int, Any] = {}
        self.cmds: dict[int, Any] = {}
        self.all_procs: list[Any] = []
        self.backlog: list[Msg] = []

    def pipe(self) -> Connection:
        """A new report pipe: the read end is watched, the write end is returned."""
        reader, writer = CTX.Pipe(duplex=False)
        self.readers.append(reader)
        return writer

    def start(self, info: ConnectionInfo, cid: int, target: Any = collector_main,
              extra: tuple[Any, ...] = ()) -> Any:
        cmd_q = CTX.Queue()
        writer = self.pipe()
        proc = self.start_process(target, (info, cid, writer, cmd_q, *extra), f"collector-{cid}")
        writer.close()  # the child holds its own copy; EOF then means the child is gone
        old = self.cmds.get(cid)
        if old is not None:  # a restart: the previous process's commands are moot
            old.cancel_join_thread()
            old.close()
        self.procs[cid], self.cmds[cid] = proc, cmd_q
        return proc

    def start_learner(self, num_collectors: int, big: bool = False) -> tuple[Any, Connection]:
        """A :func:`learner_main` child and the pipe that tells it to publish."""
        writer = self.pipe()
        go_reader, go_writer = CTX.Pipe(duplex=False)
        proc = self.start_process(learner_main, (writer, go_reader, num_collectors, big),
                                  "learner")
        writer.close()
        go_reader.close()
        return proc, go_writer

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

    def _pull(self, timeout: float) -> None:
        """Move every report that arrives within ``timeout`` s into the backlog."""
        for reader in wait(self.readers, max(timeout, 0)):
            assert isinstance(reader, Connection)
            try:
                self.backlog.append(reader.recv())
            except (EOFError, OSError):  # the child is gone (or died mid-write)
                self.readers.remove(reader)
                reader.close()

    def take(self, pred: Callable[[Msg], bool], timeout: float, what: str,
             pump: Callable[[], Any] | None = None) -> Msg:
        """The first report matching ``pred`` (others kept for later).

        ``pump`` (e.g. the sender's ``wait_ack`` with a short timeout) runs between
        waits when the learner must act for the report to come.
        """
        deadline = time.monotonic() + timeout
        while True:
            for i, msg in enumerate(self.backlog):
                if pred(msg):
                    return self.backlog.pop(i)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}; "
                                     f"backlog: {self.backlog}")
            if pump is not None:
                pump()
                self._pull(min(remaining, 0.5))
            else:
                self._pull(remaining)

    def applied(self, cid: int, version: int, timeout: float = 30.0) -> Msg:
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

    def collect_for(self, seconds: float) -> None:
        """Gather every report sent in the next ``seconds`` (to check what did *not*
        arrive, e.g. no stale version)."""
        end = time.monotonic() + seconds
        while (remaining := end - time.monotonic()) > 0:
            self._pull(remaining)

    def stop(self, *cids: int) -> None:
        """Ask collectors to stop and wait for each one's exit report."""
        for cid in cids:
            self.cmds[cid].put("stop")
        for cid in cids:
            self.take(lambda m, c=cid: m[0] == "exit" and m[1] == c, 30, f"{cid} to exit")

    def shutdown(self) -> None:
        for proc in self.all_procs:
            if proc.is_alive():
                proc.kill()
        for proc in self.all_procs:
            proc.join(10)
        alive = [p.pid for p in self.all_procs if p.is_alive()]
        for q in self.cmds.values():
            q.cancel_join_thread()
            q.close()
        for reader in self.readers:
            reader.close()
        assert not alive, f"processes left alive: {alive}"


def connect_all(sender: WeightSender, cluster: Cluster, ids: list[int]) -> None:
    info = sender.connection_info
    for cid in ids:
        cluster.start(info, cid)
    sender.connect(timeout=90)
    for cid in ids:
        msg = cluster.applied(cid, 0)
        assert msg[2] == 0 and msg[3] == expected(0), msg
