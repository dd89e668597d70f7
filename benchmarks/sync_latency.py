"""Round latency of weight-sync next to the raw limit, measured in the same run.

A round is ``send_weights_async`` to all N collectors + ``wait_ack`` from all of them.
Collectors are real processes (spawn, ``torch.set_num_threads(1)``) that block in
``receive_weights(timeout=...)``; the learner also runs with one thread. The raw limit
is one flat contiguous ``uint8`` tensor of the same bytes over gloo send/recv
(``benchmarks.baselines.measure_raw_gloo``). Medians and p90 over ``rounds`` rounds
after ``warmup`` rounds; the two are run one after the other per configuration.

    python -m benchmarks.sync_latency --sizes 100000 1000000 10000000 100000000 \
        --collectors 1 2 4 --rounds 30 --json-out results/sync_latency.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import statistics
import sys
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from benchmarks.baselines import (
    collect_results,
    fingerprint,
    measure_raw_gloo,
    reap,
    summarize,
    wait_up,
)
from benchmarks.policies import count_leaves, make_policy
from weight_sync import ConnectionInfo, WeightReceiver, WeightSender
from weight_sync.errors import ClosedError, PeerGone
from weight_sync.transports import transport_names
from weight_sync.transports.registry import AUTO

__all__ = ["measure_weight_sync", "receive_until_closed", "timed_rounds", "main"]


def receive_until_closed(receiver: WeightReceiver, idx: int, q: Any, timeout: float) -> None:
    """Put ``("up", idx, None)`` on ``q`` (:func:`~benchmarks.baselines.wait_up`), connect
    ``receiver`` and apply every version, blocking, until the learner closes the stream."""
    q.put(("up", idx, None))
    receiver.connect(timeout)
    try:
        while True:
            receiver.receive_weights(timeout=timeout)
    except (ClosedError, PeerGone):
        pass


def timed_rounds(sender: WeightSender, policy: torch.nn.Module, rounds: int, warmup: int,
                 timeout: float, copies: list[float] | None = None
                 ) -> list[tuple[float, float, float]]:
    """Run ``warmup + rounds`` rounds, each after new values in every parameter (as a
    training step would), and return the ``perf_counter`` times of the timed ones:
    ``(start, send_weights_async returned, wait_ack returned)``.

    ``copies``: also time, in each timed round, one ``copy_`` of the message's bytes
    between two tensors of this process (before the round on even rounds, after it on
    odd ones), appended here: the memcpy limit at the same moment as the round, with
    the same processes running."""
    windows = []
    src = dst = None
    if copies is not None:
        src = torch.randint(0, 256, (sender.layout.nbytes,), dtype=torch.uint8)
        dst = torch.zeros_like(src)

    def copy(r: int) -> None:
        if src is not None and dst is not None and copies is not None:
            c0 = time.perf_counter()
            dst.copy_(src)
            if r >= warmup:
                copies.append(time.perf_counter() - c0)

    for r in range(warmup + rounds):
        if r % 2 == 0:
            copy(r)
        with torch.no_grad():
            for t in policy.parameters():
                t.add_(1e-3)
        t0 = time.perf_counter()
        sender.send_weights_async()
        t1 = time.perf_counter()
        sender.wait_ack(timeout)
        if r >= warmup:
            windows.append((t0, t1, time.perf_counter()))
        if r % 2 == 1:
            copy(r)
    return windows


def _collector(idx: int, info: ConnectionInfo, spec: tuple[int, str], timeout: float,
               q: Any) -> None:
    """Collector process: blocking receive loop until the learner closes."""
    try:
        torch.set_num_threads(1)
        policy = make_policy(spec[0], spec[1], seed=1000 + idx)  # differs until synced
        receiver = WeightReceiver(policy, info, idx, timeout=timeout)
        receive_until_closed(receiver, idx, q, timeout)
        q.put(("ok", idx, (receiver.version, fingerprint(policy))))
        receiver.close()
    except BaseException:  # report any failure to the parent, which raises it
        import traceback

        q.put(("error", idx, traceback.format_exc()))


def measure_weight_sync(params: int, kind: str = "wide", num_collectors: int = 1,
                        rounds: int = 30, warmup: int = 3, timeout: float = 120.0,
                        **sender_options: Any) -> dict[str, Any]:
    """Measure weight-sync rounds; checks the collectors end bit-exact with the learner.

    ``sender_options`` go to :class:`WeightSender` (e.g. ``transport``, ``chunk_bytes``);
    none: what a user with no settings gets.

    Returns:
        ``summarize`` figures plus ``async_median_s`` (learner time inside
        ``send_weights_async``), ``memcpy_in_round_median_s`` (a memcpy of the same
        bytes in the learner's process, timed between its rounds), ``placements``
        (transport -> how many collectors the sender placed on it,
        :attr:`WeightSender.transports`), ``leaves`` and ``correct``.
    """
    ctx = mp.get_context("spawn")
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    policy = make_policy(params, kind, seed=0)
    sender = WeightSender(policy, num_collectors, timeout=timeout, **sender_options)
    q = ctx.Queue()
    procs = [ctx.Process(target=_collector, args=(i, sender.connection_info, (params, kind),
                                                   timeout, q), daemon=True)
             for i in range(num_collectors)]
    try:
        for p in procs:
            p.start()
        wait_up(q, procs, timeout)  # a worker that died at start fails here, not in connect
        sender.connect(timeout)
        copies: list[float] = []
        windows = timed_rounds(sender, policy, rounds, warmup, timeout, copies)
        samples = [t2 - t0 for t0, _, t2 in windows]
        in_async = [t1 - t0 for t0, t1, _ in windows]
        expected = fingerprint(policy)
        final_version = sender.version
        placements = dict(Counter(sender.transports.values()))
        sender.close()
        results = collect_results(q, num_collectors, timeout)
    finally:
        sender.close()
        reap(procs, 30.0)
        torch.set_num_threads(previous)
    out = summarize(samples, sender.layout.nbytes, num_collectors)
    out.update(
        async_median_s=statistics.median(in_async),  # the median as summarize() takes it
        memcpy_in_round_median_s=statistics.median(copies),
        placements=placements,
        leaves=count_leaves(policy),
        correct=all(v == final_version and fp == expected for v, fp in results.values()),
    )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+",
                        default=[100_000, 1_000_000, 10_000_000, 100_000_000])
    parser.add_argument("--collectors", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--kind", default="wide", choices=["wide", "deep"])
    parser.add_argument("--transport", default="default",
                        choices=["default", *transport_names(), AUTO],
                        help="'default': no transport keyword (what a user with no settings "
                             "gets); any other name is forced")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args(argv)
    rows = []
    for params in args.sizes:
        for n in args.collectors:
            rounds = args.rounds if params < 50_000_000 else max(5, args.rounds // 3)
            forced = {} if args.transport == "default" else {"transport": args.transport}
            ours = measure_weight_sync(params, args.kind, n, rounds, args.warmup, **forced)
            raw = measure_raw_gloo(int(ours["nbytes"]), n, rounds, args.warmup)
            row = {
                "params": params, "kind": args.kind, "num_collectors": n,
                "transport": args.transport,
                "nbytes": ours["nbytes"], "leaves": ours["leaves"],
                "weight_sync": {k: v for k, v in ours.items() if k != "samples_s"},
                "raw_gloo": {k: v for k, v in raw.items() if k != "samples_s"},
                "ratio_to_raw": ours["median_s"] / raw["median_s"],
            }
            rows.append(row)
            print(f"{params:>11,} params N={n}: weight-sync {ours['median_s'] * 1e3:8.2f} ms "
                  f"(p90 {ours['p90_s'] * 1e3:7.2f}, async {ours['async_median_s'] * 1e3:6.2f}) "
                  f"raw {raw['median_s'] * 1e3:8.2f} ms  ratio {row['ratio_to_raw']:.2f}  "
                  f"correct={ours['correct']}", flush=True)
    report = {"benchmark": "sync_latency", "date": datetime.now(timezone.utc).isoformat(),
              "machine": {"platform": platform.platform(), "cpus": mp.cpu_count(),
                          "torch": torch.__version__, "python": sys.version.split()[0]},
              "threads": "learner and collectors torch.set_num_threads(1)", "rows": rows}
    text = json.dumps(report, indent=2)
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
