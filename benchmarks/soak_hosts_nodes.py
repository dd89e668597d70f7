"""The processes of ``benchmarks.soak_hosts``: ``python -m benchmarks.soak_hosts_nodes
<role> <json args>`` with role ``learner`` or ``collector``.

Each prints JSON lines on stdout (one ``write`` each, so a SIGKILL never tears one) and
reads nothing but its arguments; the learner also reads ``stop`` on stdin. Every wait
is bounded.

The weights of version *v* are a pure function of *v* (:func:`make_weights`): every
collector checks each version it applies against its own copy, exactly, whichever
learner incarnation sent it.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from typing import Any

import torch

from benchmarks.soak import rss_kib

torch.set_num_threads(1)

STREAM = "soak"


def emit(**fields: Any) -> None:
    os.write(1, (json.dumps(fields) + "\n").encode())


def make_weights(numel: int, version: int) -> dict[str, torch.Tensor]:
    """Version ``version``'s weights: float, integer and bool leaves, all depending on it."""
    gen = torch.Generator().manual_seed(version + 1_000_003)
    half = numel // 2
    return {
        "encoder.w": torch.randn(half, generator=gen),
        "head.w": torch.randn(numel - half, generator=gen).mul_(version % 7 + 1),
        "step": torch.tensor([version], dtype=torch.int64),
        "mask": torch.rand(64, generator=gen) > 0.5,
    }


def matches(weights: dict[str, torch.Tensor], numel: int, version: int) -> bool:
    want = make_weights(numel, version)
    return all(torch.equal(weights[k], want[k]) for k in want)


def learner(a: dict[str, Any]) -> None:
    """Rounds until ``stop`` on stdin: weights of the next version, send, wait for acks
    (a failed or lagging collector is reported, not fatal); then a last catch-up round
    and ``close``. Starts at ``a["start_version"]`` (its "checkpoint")."""
    from weight_sync import WeightSender
    from weight_sync.errors import CollectorFailed, WeightSyncError, WeightSyncTimeout
    from weight_sync.metrics import AckResult

    stop = threading.Event()

    def read_stdin() -> None:
        for line in sys.stdin:
            if line.strip() == "stop":
                break
        stop.set()

    threading.Thread(target=read_stdin, daemon=True).start()
    numel, version = a["numel"], a["start_version"]
    weights = make_weights(numel, version)
    tx = WeightSender(weights, a["n"], host=a["address"], port=a["port"], name=STREAM,
                      timeout=a["timeout"], liveness_timeout=a["liveness"], version=version)
    emit(up=True, pid=os.getpid(), version=tx.version)
    tx.connect(timeout=a["connect_timeout"])
    emit(connected=True, version=tx.version, rss_kib=rss_kib())
    step = a["step_ms"] / 1000
    while not stop.is_set():
        begin = time.monotonic()
        for key, value in make_weights(numel, tx.version + 1).items():
            weights[key].copy_(value)
        save_checkpoint(a["checkpoint"], tx.version + 1)  # before anyone may hold it
        sent_at = time.monotonic()
        tx.send_weights_async()
        result: object = None
        try:
            result = tx.wait_ack(timeout=a["ack_timeout"])
        except (CollectorFailed, WeightSyncTimeout) as exc:
            result = exc.result
        failed = result.failed if isinstance(result, AckResult) else {}
        lagging = list(result.lagging) if isinstance(result, AckResult) else []
        wait_s = time.monotonic() - sent_at
        emit(round=True, version=tx.version, wait_s=round(wait_s, 4),
             failed={str(c): why[:200] for c, why in failed.items()}, lagging=lagging,
             live=sorted(tx.links), rss_kib=rss_kib())
        stop.wait(max(step - (time.monotonic() - begin), 0))
    try:
        tx.wait_for(range(a["n"]), timeout=a["final_timeout"])
        emit(final=True, version=tx.version, acked=sorted(tx.links), rss_kib=rss_kib())
    except WeightSyncError as exc:
        emit(final=True, version=tx.version, acked=sorted(tx.links), error=str(exc)[:500],
             rss_kib=rss_kib())
    tx.close()


def collector(a: dict[str, Any]) -> None:
    """Connect (waiting for a learner), then poll between "env steps" until the learner
    closes; every apply checked exactly. Reports joins, re-attaches, mismatches, polls
    that overran their bound, and a summary at the end."""
    from weight_sync import WeightReceiver
    from weight_sync.control.discovery import info_from_address
    from weight_sync.errors import ClosedError, WeightSyncError

    numel, cid = a["numel"], a["cid"]
    weights = make_weights(numel, -1)
    try:
        info = info_from_address(a["address"], a["port"], STREAM,
                                 timeout=a["connect_timeout"])
    except WeightSyncError as exc:
        emit(cid=cid, exit=f"{type(exc).__name__}: {str(exc)[:300]}", applies=0,
             mismatches=0, slow_polls=0, steps=0, worst_poll_s=0.0, version=-1)
        return
    rx = WeightReceiver(weights, info, cid, timeout=a["timeout"],
                        reattach_timeout=a["reattach_timeout"])
    applies = bad = slow = steps = 0
    worst = 0.0

    def check(version: int) -> None:
        nonlocal applies, bad
        applies += 1
        if not matches(weights, numel, version):
            bad += 1
            emit(cid=cid, mismatch=version)

    try:
        first = rx.connect(timeout=a["connect_timeout"])
        check(first)
        emit(cid=cid, joined=first, pid=os.getpid(), ok=bad == 0)
        epoch = rx.epoch
        while True:
            t = time.monotonic()
            version = rx.receive_weights(timeout=a["poll_s"])
            took = time.monotonic() - t
            worst = max(worst, took)
            if took > a["poll_bound_s"]:
                slow += 1
                emit(cid=cid, slow_poll=round(took, 3))
            steps += 1
            if version is not None:
                check(version)
                if rx.epoch != epoch:
                    epoch = rx.epoch
                    emit(cid=cid, reattached=version, epoch=epoch)
    except ClosedError:
        end = "closed"
    except Exception as exc:  # reported, whatever it is: the soak counts it
        end = f"{type(exc).__name__}: {str(exc)[:300]}"
    finally:
        rx.close()
    emit(cid=cid, exit=end, applies=applies, mismatches=bad, slow_polls=slow, steps=steps,
         worst_poll_s=round(worst, 3), version=rx.version)


def save_checkpoint(path: str, version: int) -> None:
    """The version a restarted learner resumes from (written whole, then renamed)."""
    with open(path + ".tmp", "w") as file:
        file.write(str(version))
    os.replace(path + ".tmp", path)


def load_checkpoint(path: str) -> int:
    try:
        with open(path) as file:
            return int(file.read())
    except FileNotFoundError:
        return 0


if __name__ == "__main__":
    role, args = sys.argv[1], json.loads(sys.argv[2])
    {"learner": learner, "collector": collector}[role](args)
