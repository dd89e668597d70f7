"""The processes of ``benchmarks.faults``: ``python -m benchmarks.faults_nodes <role>
<json args>`` with role ``learner``, ``collector`` or ``garbage``.

Each prints JSON lines on stdout (one ``write`` each, so a SIGKILL never tears one),
every line stamped with ``time.time()`` (one clock for every simulated host: they share
the machine's), and reads commands on stdin, one per line. Every wait is bounded.

The weights of version *v* are a pure function of *v* (:func:`expected`): every
collector checks every version it applies against its own copy, exactly, whichever
learner incarnation sent it, and reports each apply with ``ok``.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import sys
import threading
import time
from typing import Any

import torch

torch.set_num_threads(1)

from benchmarks.soak_hosts_nodes import load_checkpoint, save_checkpoint  # noqa: E402

STREAM = "faults"


def emit(ev: str, **fields: Any) -> None:
    os.write(1, (json.dumps({"ev": ev, "t": time.time(), **fields}) + "\n").encode())


# -- weights that are a function of the version ----------------------------------------
def _base(numel: int) -> torch.Tensor:
    return torch.randn(numel, generator=torch.Generator().manual_seed(20261207))


def expected(base: torch.Tensor, version: int) -> dict[str, torch.Tensor]:
    """Version ``version``'s weights: float and integer leaves, all depending on it."""
    return {"w": base + version,
            "k": (torch.arange(4096, dtype=torch.int32) * 7 + version) % 1009,
            "n": torch.tensor([version], dtype=torch.int64)}


def matches(weights: dict[str, torch.Tensor], base: torch.Tensor, version: int) -> bool:
    want = expected(base, version)
    return all(torch.equal(weights[k], want[k]) for k in want)


class Commands:
    """The lines read on stdin, in a background thread (EOF reads as ``quit``)."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.quit = threading.Event()
        self.new = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in sys.stdin:
            self.lines.append(line.strip())
            self.new.set()
            if line.strip() in ("quit", "stop"):
                break
        self.quit.set()

    def take(self, prefix: str) -> str | None:
        """The first unconsumed command starting with ``prefix``, consumed."""
        for i, line in enumerate(self.lines):
            if line.startswith(prefix):
                return self.lines.pop(i)
        return None


# -- the learner -------------------------------------------------------------------------
def learner(a: dict[str, Any]) -> None:
    """Rounds every ``step_ms`` until ``stop``: the next version, ``send_weights_async``,
    ``wait_ack`` (a failed or lagging collector is reported, not fatal), then ``close``.
    Starts at the version in ``a["checkpoint"]`` (written before each send)."""
    from weight_sync import WeightSender
    from weight_sync.control.store import connect_client
    from weight_sync.errors import CollectorFailed, WeightSyncError, WeightSyncTimeout
    from weight_sync.metrics import AckResult

    cmds = Commands()
    base = _base(a["numel"])
    version = load_checkpoint(a["checkpoint"])
    weights = expected(base, version)
    try:
        tx = WeightSender(weights, a["n"], host=a["address"], port=a["port"], name=STREAM,
                          timeout=a["timeout"], liveness_timeout=a["liveness"],
                          transport=a["transport"], secret=a["secret"],
                          max_collectors=a["max_collectors"], version=version)
    except WeightSyncError as exc:
        emit("error", where="init", kind=type(exc).__name__, why=str(exc)[:400])
        return  # reported: the runner judges it
    store = connect_client(a["address"], a["port"], a["timeout"])
    emit("up", pid=os.getpid(), v=tx.version)
    try:
        tx.connect(timeout=a["connect_timeout"])
    except WeightSyncError as exc:
        emit("error", where="connect", kind=type(exc).__name__, why=str(exc)[:400])
        tx.close()
        return
    emit("connected", v=tx.version, transports={str(c): t for c, t in tx.transports.items()},
         keys=store.num_keys())
    step = a["step_ms"] / 1000
    while not cmds.quit.is_set():
        begin = time.monotonic()
        v = tx.version + 1
        with torch.no_grad():
            for key, value in expected(base, v).items():
                weights[key].copy_(value)
        save_checkpoint(a["checkpoint"], v)  # before any collector may hold it
        result: AckResult | None = None
        kind = ""
        try:
            tx.send_weights_async()
            result = tx.wait_ack(timeout=a["ack_timeout"])
        except (CollectorFailed, WeightSyncTimeout) as exc:
            got = exc.result
            result = got if isinstance(got, AckResult) else None
            kind = type(exc).__name__
        except WeightSyncError as exc:  # reported; the run goes on (the matrix judges it)
            kind = f"{type(exc).__name__}: {str(exc)[:200]}"
        emit("round", v=tx.version, wait_s=round(time.monotonic() - begin, 4), raised=kind,
             failed={str(c): why[:200] for c, why in
                     (result.failed if result is not None else {}).items()},
             lagging=list(result.lagging) if result is not None else [],
             acked=list(result.acked) if result is not None else [], links=sorted(tx.links),
             transports={str(c): t for c, t in tx.transports.items()},
             keys=store.num_keys())
        cmds.quit.wait(max(step - (time.monotonic() - begin), 0))
    emit("final", v=tx.version, keys=store.num_keys(), links=sorted(tx.links),
         held=held_keys(store, a["max_collectors"], tx.version))
    tx.close()
    emit("closed")


def held_keys(store: Any, collectors: int, version: int) -> list[str]:
    """The per-collector keys of the stream that exist now (probed: a store cannot list
    its keys), for the leftover count."""
    from weight_sync.wire.protocol import Keys

    keys = Keys(STREAM)
    names = []
    for cid in range(collectors):
        names.append(keys.join(cid))
        for inc in range(1, 6):
            names += [keys.hello(cid, inc), keys.admit(cid, inc), keys.alive(cid, inc),
                      keys.bye(cid, inc)]
            names += [keys.update(cid, inc, s) for s in range(version + 3)]
            names += [keys.ack(cid, inc, v) for v in range(version + 3)]
            names += [keys.resend(cid, inc, s) for s in range(version + 3)]
    return [n[len(keys.prefix):] for n in names if store.check([n])]


# -- a collector -------------------------------------------------------------------------
class Faults:
    """Receive hooks that act once armed (by a command): kill this process or the
    learner half-way through a message, or flip a bit of the next messages."""

    def __init__(self, cmds: Commands) -> None:
        self.cmds = cmds
        self.lock = threading.Lock()
        self.fire: tuple[str, int] | None = None  # ("self" | "learner", pid), armed
        self.flips = 0  # versions still to corrupt (once each)
        self.flipped: set[int] = set()
        self.nbytes = 0

    def poll_commands(self) -> None:
        if (cmd := self.cmds.take("die")) is not None:
            self.fire = ("self", os.getpid())
        if (cmd := self.cmds.take("kill_learner")) is not None:
            self.fire = ("learner", int(cmd.split()[1]))
        if (cmd := self.cmds.take("flip")) is not None:
            self.flips = int(cmd.split()[1])

    def _go(self, version: int, how: str) -> None:
        with self.lock:
            if self.fire is None:
                return
            what, pid = self.fire
            self.fire = None
        emit("mid", v=version, how=how, target=what)
        os.kill(pid, signal.SIGKILL)

    def before_receive(self, version: int, buffer: torch.Tensor | None) -> None:
        if self.fire is None:
            return
        if buffer is None:  # a lent message (shm): it is all there once signalled
            self._go(version, "signalled")
            return
        self.nbytes = buffer.numel()
        head = buffer[:64].clone()

        def watch() -> None:  # the header lands first for a message sent whole
            deadline = time.monotonic() + 10
            while self.fire is not None and time.monotonic() < deadline:
                if not torch.equal(buffer[:64], head):
                    self._go(version, "first bytes landed")
                    return
                time.sleep(0.0005)

        threading.Thread(target=watch, daemon=True).start()

    def during_receive(self, version: int, got: int) -> None:
        if self.fire is not None and 2 * got >= self.nbytes > got:
            self._go(version, "half received")

    def after_receive(self, version: int, message: torch.Tensor) -> None:
        from weight_sync.wire.layout import HEADER_BYTES

        with self.lock:
            if self.flips <= 0 or version in self.flipped:
                return
            self.flipped.add(version)
            self.flips -= 1
        index = HEADER_BYTES + random.randrange(message.numel() - HEADER_BYTES)
        message[index] ^= 1 << random.randrange(8)
        emit("flipped", v=version, index=index)


class _LostLog(logging.Handler):
    """Turns the receiver's "lost the learner" warning into an event (the receiver
    says it only in its log; ``receive_weights`` returns ``None`` while re-attaching)."""

    def emit(self, record: logging.LogRecord) -> None:
        if "lost the learner" in str(record.msg):
            emit("lost", why=record.getMessage()[:300])


def collector(a: dict[str, Any]) -> None:
    """Join, then poll between "env steps" until ``quit``; every apply checked exactly.
    With ``rejoin``, a stream that ends (other than by ``quit``) is joined again by a
    new receiver in this process, until ``rejoin_s`` after the end."""
    from weight_sync import WeightReceiver
    from weight_sync.collector.hooks import ReceiverHooks
    from weight_sync.control.discovery import info_from_address
    from weight_sync.errors import WeightSyncError

    logging.getLogger("weight_sync.collector.receiver").addHandler(_LostLog())
    cmds = Commands()
    faults = Faults(cmds)
    hooks = ReceiverHooks(before_receive=faults.before_receive,
                          during_receive=faults.during_receive,
                          after_receive=faults.after_receive)
    base = _base(a["numel"])
    weights = expected(base, -7)
    cid = a["cid"]
    applied = -1
    joins = attempts = 0
    while not cmds.quit.is_set():
        emit("joining", attempt=attempts)
        rx = None
        try:
            # a join again is bounded more tightly: quit is read between attempts
            bound = a["connect_timeout"] if attempts == 0 else min(a["connect_timeout"], 10.0)
            attempts += 1
            info = info_from_address(a["address"], a["port"], STREAM, timeout=bound)
            rx = WeightReceiver(weights, info, cid, timeout=a["timeout"], hooks=hooks,
                                learner_timeout=a["learner_timeout"],
                                reattach_timeout=a["reattach_timeout"],
                                accept_rewind=False, secret=a["secret"])
            v = rx.connect(timeout=bound)
            joins += 1
            emit("joined", v=v, ok=matches(weights, base, v), transport=rx.transport,
                 pid=os.getpid(), join=joins)
            applied, epoch = v, rx.epoch
            while not cmds.quit.is_set():
                faults.poll_commands()
                got = rx.receive_weights(timeout=a["poll_s"])
                if got is not None:
                    emit("applied", v=got, ok=matches(weights, base, got),
                         epoch=rx.epoch)
                    applied = got
                    if rx.epoch != epoch:
                        epoch = rx.epoch
                        emit("reattached", v=got, epoch=epoch)
            end = {"kind": "quit", "why": ""}
        except WeightSyncError as exc:
            end = {"kind": type(exc).__name__, "why": str(exc)[:300]}
        finally:
            if rx is not None:
                refused = rx.refused
                rx.close()
            else:
                refused = 0
        emit("end", refused=refused, v=applied, **end)
        if not a["rejoin"] or end["kind"] == "quit":
            break
        if cmds.quit.wait(0.2):  # a short pause before joining again, unless told to quit
            break
    emit("exit")


# -- a foreign process -------------------------------------------------------------------
def garbage(a: dict[str, Any]) -> None:
    """Write garbage into the learner's store: random keys and values, and, in the
    stream's own namespace, join counters and a malformed hello and heartbeat for an
    id nobody serves. Reports how many keys it created."""
    from weight_sync.control.store import connect_client
    from weight_sync.wire.protocol import Keys

    store = connect_client(a["address"], a["port"], 30)
    rng = random.Random(0)
    keys = Keys(STREAM)
    before = store.num_keys()
    for i in range(a["count"]):
        store.set(f"junk/{i}/{rng.getrandbits(32):x}", rng.randbytes(rng.randrange(1, 512)).hex())
    spare = a["spare"]
    for inc in (1, 2, 3):
        store.add(keys.join(spare), 1)
        store.add(keys.joins, 1)
        store.set(keys.hello(spare, inc), rng.randbytes(32).hex() + "\xff{")
        store.set(keys.alive(spare, inc), "not a counter")
    emit("wrote", keys=store.num_keys() - before)


if __name__ == "__main__":
    role, args = sys.argv[1], json.loads(sys.argv[2])
    {"learner": learner, "collector": collector, "garbage": garbage}[role](args)
