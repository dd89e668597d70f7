"""Test weights that are a pure function of the version, and the child processes
(collectors and learners, some of which die on purpose) that sync them and report
what they applied.

Weights are a pure function of the version (:func:`make_weights`), so a fingerprint
can be checked against the expected one for the version alone (bit-exact).

The children are module-level (picklable by reference) and run under the process
harness (``harness.py``): a :class:`harness.Cluster` starts them as
``collector_main(info, cid, out, cmds, ...)`` and ``learner_main(out, go, ...)``,
watches their reports on ``out`` and reaps them. Nothing here starts, waits on or
kills a process of its own.
"""

from __future__ import annotations

import hashlib
import os
import signal
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection

import torch
from harness import Cluster

from weight_sync import ConnectionInfo, WeightReceiver, WeightSender, WeightSyncError
from weight_sync.collector.hooks import ReceiverHooks

MARGIN_S = 15.0  # slack for a loaded 2-core machine: a hang guard, not a speed claim
RX_TIMEOUT_S = 20.0
#: Elements of the large policy used to catch a transfer in the middle (128 MB).
BIG_NUMEL = 32 * 2**20


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
    """Hooks that call ``action(version, tail_unwritten)`` once, when a message of
    ``min_version`` or newer is partly received, and ``tail_unwritten`` tells whether
    its last bytes had not landed yet.

    A message sent whole is caught by a thread that watches the buffer while the real
    receive runs (``before_receive`` starts it): its header lands first. A streamed
    message (its header lands last) is caught by ``during_receive`` once half of it
    landed.
    """
    lock = threading.Lock()
    state = {"fired": False, "nbytes": 0}

    def fire_once(version: int, tail_unwritten: bool) -> None:
        with lock:
            if state["fired"]:
                return
            state["fired"] = True
        action(version, tail_unwritten)

    def watch_from(version: int, buffer: torch.Tensor | None) -> None:
        if version < min_version or buffer is None:
            return
        state["nbytes"] = buffer.numel()
        head, tail = buffer[:64].clone(), buffer[-64:].clone()

        def watch() -> None:
            deadline = time.monotonic() + RX_TIMEOUT_S
            while time.monotonic() < deadline and not state["fired"]:
                if not torch.equal(buffer[:64], head):
                    fire_once(version, torch.equal(buffer[-64:], tail))
                    return

        threading.Thread(target=watch, daemon=True).start()

    def halfway(version: int, got: int) -> None:
        if version >= min_version and 2 * got >= state["nbytes"] > got:
            fire_once(version, True)

    return ReceiverHooks(before_receive=watch_from, during_receive=halfway)


# -- children (module level: picklable by reference; run under harness.Cluster) -----
def _command(cmds: Connection, timeout: float) -> str | None:
    """The test's next command within ``timeout`` s, if any; ``"stop"`` once the test
    closed its end."""
    if not cmds.poll(timeout):
        return None
    try:
        return str(cmds.recv())
    except EOFError:
        return "stop"


def collector_main(info: ConnectionInfo, cid: int, out: Connection, cmds: Connection,
                   big: bool = False, hooks: ReceiverHooks | None = None) -> None:
    """Connect, then poll; report every apply; obey pause/resume/stop."""
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
            # while paused, block on the commands instead of polling weights
            cmd = _command(cmds, RX_TIMEOUT_S if paused else 0)
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
                                cmds: Connection) -> None:
    """A big-policy collector that SIGKILLs itself halfway through receiving v1."""

    def die(version: int, tail_unwritten: bool) -> None:
        out.send(("mid", cid, version, tail_unwritten, os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)

    collector_main(info, cid, out, cmds, big=True, hooks=mid_transfer_hooks(1, die))


def collector_dies_in_handshake(info: ConnectionInfo, cid: int, out: Connection,
                                cmds: Connection) -> None:
    """A collector that is admitted, then SIGKILLs itself before building its end of
    the link (the learner's rendezvous then waits for nobody)."""

    def die(collector_id: int, incarnation: int) -> None:
        out.send(("handshake", cid, incarnation, None, os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)

    collector_main(info, cid, out, cmds, hooks=ReceiverHooks(before_connect=die))


def collector_kills_learner_mid_transfer(info: ConnectionInfo, cid: int, out: Connection,
                                         cmds: Connection, learner_pid: int) -> None:
    """A big-policy collector that SIGKILLs the learner halfway through receiving v1."""

    def kill_learner(version: int, tail_unwritten: bool) -> None:
        os.kill(learner_pid, signal.SIGKILL)
        out.send(("mid", cid, version, tail_unwritten, os.getpid()))

    collector_main(info, cid, out, cmds, big=True, hooks=mid_transfer_hooks(1, kill_learner))


def learner_main(out: Connection, go: Connection, num_collectors: int,
                 big: bool = False) -> None:
    """A learner that connects, publishes version 1 when told, then waits to be killed."""
    weights = big_weights(0) if big else make_weights(0)
    # The big policy is for catching a transfer mid-way: sends, not shared memory.
    sender = WeightSender(weights, num_collectors, timeout=RX_TIMEOUT_S,
                          transport="distributed" if big else "auto")
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


# -- used with a Cluster ----------------------------------------------------------------
def connect_all(sender: WeightSender, cluster: Cluster, ids: list[int]) -> None:
    """Start a :func:`collector_main` per id, connect, check everyone is at version 0."""
    info = sender.connection_info
    for cid in ids:
        cluster.start(info, cid, collector_main)
    sender.connect(timeout=90)
    for cid in ids:
        msg = cluster.applied(cid, 0)
        assert msg[2] == 0 and msg[3] == expected(0), msg
