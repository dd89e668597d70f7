"""Where a round's time goes: timers around each hand-off, learner and one collector.

Both processes stamp ``time.perf_counter()`` (the same monotonic clock on one host) as
a round passes each hand-off: the learner's ``send_weights_async`` starts, its snapshot
is packed, it posts the collector's signal, the collector reads the signal, its receive
returns (bytes landed, checked), its apply starts and ends (then it acks), the learner's
``wait_ack`` returns. The stamps come from wrappers put around those calls in both processes
(``weight_sync`` itself carries no timers); each costs a few microseconds, so the
stages are a little longer than in an unwrapped round. Medians over the rounds, after
warmup; the collector blocks in ``receive_weights``, both ends run
``torch.set_num_threads(1)``.

    python -m benchmarks.round_timeline --params 1e5 --kind deep --rounds 60
    python -m benchmarks.round_timeline --params 1e7 --kind wide      # the default: "auto"
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing as mp
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.baselines import collect_results, reap, wait_up
from benchmarks.policies import make_policy
from benchmarks.sync_latency import receive_until_closed, timed_rounds
from weight_sync import WeightReceiver, WeightSender
from weight_sync.collector.policy_buffers import PolicyBuffers
from weight_sync.collector.receiver_link import ReceiverLink
from weight_sync.control.channel import Control
from weight_sync.wire.snapshots import SnapshotPool

__all__ = ["STAGES", "measure_timeline", "main"]

Stamps = list[tuple[str, float]]

STAGES = [
    ("pack", "start", "packed"),
    ("post send", "packed", "signal posted"),
    ("signal to collector", "signal posted", "signal read"),
    ("receive and check", "signal read", "received"),
    ("hand-off to apply", "received", "apply start"),
    ("apply", "apply start", "applied"),
    ("ack to learner", "applied", "end"),
]
"""``(stage, from stamp, to stamp)``, in the order a round passes them."""


def _stamp(stamps: Stamps, owner: Any, name: str, label: str, before: bool) -> None:
    """Wrap ``owner.name`` to append ``(label, time)`` when it starts or returns."""
    real: Callable[..., Any] = getattr(owner, name)

    @functools.wraps(real)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if before:
            stamps.append((label, time.perf_counter()))
        out = real(*args, **kwargs)
        if not before:
            stamps.append((label, time.perf_counter()))
        return out

    setattr(owner, name, wrapped)


def _instrument(stamps: Stamps) -> None:
    _stamp(stamps, SnapshotPool, "fill", "packed", before=False)
    _stamp(stamps, Control, "post_update", "signal posted", before=True)
    _stamp(stamps, Control, "next_update", "signal read", before=False)
    _stamp(stamps, ReceiverLink, "receive", "received", before=False)
    _stamp(stamps, PolicyBuffers, "apply", "apply start", before=True)
    # Not the ack's return: the learner may see the ack before the collector's call
    # returns, and the round's window ends there.
    _stamp(stamps, PolicyBuffers, "apply", "applied", before=False)


def _collector(info: Any, params: int, kind: str, timeout: float, q: Any) -> None:
    try:
        torch.set_num_threads(1)
        stamps: Stamps = []
        _instrument(stamps)
        receiver = WeightReceiver(make_policy(params, kind, seed=7), info, 0, timeout=timeout)
        receive_until_closed(receiver, 0, q, timeout)
        receiver.close()
        q.put(("ok", 0, stamps))
    except BaseException:  # reported to the parent, which raises it
        import traceback

        q.put(("error", 0, traceback.format_exc()))


def _first_within(stamps: Stamps, start: float, end: float) -> dict[str, float]:
    out: dict[str, float] = {}
    for label, t in stamps:
        if start <= t <= end:
            out.setdefault(label, t)
    return out


def measure_timeline(params: int, kind: str = "deep", rounds: int = 60, warmup: int = 5,
                     transport: str = "auto", timeout: float = 60.0
                     ) -> dict[str, Any]:
    """Median milliseconds of each of :data:`STAGES`, of the whole round and of
    ``send_weights_async``; rounds missing a stamp (a transport that skips a hand-off)
    count only in the stages they have."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    stamps: Stamps = []
    _instrument(stamps)
    policy = make_policy(params, kind, seed=0)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    sender = WeightSender(policy, 1, timeout=timeout, transport=transport)
    proc = ctx.Process(target=_collector, args=(sender.connection_info, params, kind,
                                                timeout, q), daemon=True)
    try:
        proc.start()
        wait_up(q, [proc], timeout)
        sender.connect(timeout)
        copies: list[float] = []
        windows = timed_rounds(sender, policy, rounds, warmup, timeout, copies)
        sender.close()
        theirs = collect_results(q, 1, timeout)[0]
    finally:
        sender.close()
        reap([proc], 30.0)
        torch.set_num_threads(previous)
    spans: dict[str, list[float]] = {stage: [] for stage, _, _ in STAGES}
    for t0, _, t2 in windows:
        at = {**_first_within(theirs, t0, t2), **_first_within(stamps, t0, t2),
              "start": t0, "end": t2}
        for stage, a, b in STAGES:
            if a in at and b in at and at[b] >= at[a]:
                spans[stage].append(at[b] - at[a])
    return {
        "params": params, "kind": kind, "transport": transport, "rounds": rounds,
        "round_ms": statistics.median(t2 - t0 for t0, _, t2 in windows) * 1e3,
        "async_ms": statistics.median(t1 - t0 for t0, t1, _ in windows) * 1e3,
        "memcpy_in_round_ms": statistics.median(copies) * 1e3,
        "stages_ms": {stage: statistics.median(v) * 1e3 if v else None
                      for stage, v in spans.items()},
        "stage_counts": {stage: len(v) for stage, v in spans.items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", type=float, default=1e5)
    parser.add_argument("--kind", default="deep", choices=["wide", "deep"])
    parser.add_argument("--transport", default="auto")
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args(argv)
    out = measure_timeline(int(args.params), args.kind, args.rounds, args.warmup,
                           args.transport)
    for stage, ms in out["stages_ms"].items():
        shown = "   -   " if ms is None else f"{ms:7.3f}"
        print(f"{stage:22s} {shown} ms  ({out['stage_counts'][stage]} rounds)")
    print(f"{'round':22s} {out['round_ms']:7.3f} ms  (send_weights_async "
          f"{out['async_ms']:.3f} ms, a memcpy of the message timed between rounds "
          f"{out['memcpy_in_round_ms']:.3f} ms)")
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
