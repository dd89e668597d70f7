"""Wire formats across a simulated 1 Gbit/s link: whole float32 messages, ``wire_dtype``
(bfloat16) and ``changed_only`` with half of the policy frozen, and both together.

On the project's test bed (:mod:`testbed`), a learner on host 0 sends to one collector
on host 1 over ``--rate`` links (the direct transport, one gloo pair), a policy of
``--params`` float32 parameters in two leaves: ``encoder`` (half, never changes: a
frozen encoder) and ``head`` (half, changed by every round's "optimizer step"). Series:

* ``fp32``: whole float32 messages (the default);
* ``bf16``: ``wire_dtype="bfloat16"``;
* ``changed_only``: ``changed_only=True`` (the encoder is not sent after the first sync);
* ``bf16_changed_only``: both.

Each series runs in ``--blocks`` blocks of ``--rounds`` rounds (after ``--warmup``), a
fresh learner and collector per block, the series' order reversed from one block to the
next (ABBA), so slow drifts of a shared machine fall on every series alike. Round =
``send_weights_async`` -> ``wait_ack``; after the last round the collector's weights are
compared with what the learner sent (``correct``: bit-exact, or exactly the bfloat16
rounding with ``bf16``). Bytes per round are the learner's ``stats.bytes_sent``.

    sudo python -m benchmarks.wire_formats                 # 25M params (100 MB), 2 x 6 rounds
    sudo python -m benchmarks.wire_formats --quick         # 2.5M params, 1 x 2 rounds

Writes ``benchmarks/results/wire_formats-<stamp>.json`` (``--quick``: under
``benchmarks/results/quick/``) and prints a markdown table. Needs root and iproute2.
The run quoted in the docs is kept as ``benchmarks/results/wire_formats.json``.

The nodes: ``python -m benchmarks.wire_formats learner|collector <json args>``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import testbed  # noqa: E402
from benchmarks.fanout import Procs, rate_bits  # noqa: E402
from testbed import TestBed  # noqa: E402

BENCH_DIR = Path(__file__).resolve().parent
SERIES = {"fp32": {}, "bf16": {"wire_dtype": "bfloat16"},
          "changed_only": {"changed_only": True},
          "bf16_changed_only": {"wire_dtype": "bfloat16", "changed_only": True}}
_MODULE = "benchmarks.wire_formats"


# -- the nodes ----------------------------------------------------------------------------
def _policy(numel: int) -> Any:
    import torch

    half = numel // 2
    gen = torch.Generator().manual_seed(0)
    return {"encoder": torch.randn(half, generator=gen), "head": torch.zeros(numel - half)}


def _digest(weights: dict[str, Any], wire: str = "") -> str:
    import torch

    h = hashlib.sha256()
    for name in sorted(weights):
        t = weights[name]
        if wire:  # what the collector must hold: exactly the narrowing, widened back
            t = t.to(getattr(torch, wire)).float()
        h.update(t.contiguous().view(torch.uint8).numpy())
    return h.hexdigest()


def _emit(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


def learner(a: dict[str, Any]) -> None:
    import torch

    from weight_sync import WeightSender

    torch.set_num_threads(1)
    policy = _policy(a["numel"])
    with WeightSender(policy, 1, host=a["address"], timeout=a["timeout"],
                      liveness_timeout=a["timeout"], **a["settings"]) as tx:
        _emit(info=tx.connection_info.to_json())
        tx.connect(timeout=a["timeout"])
        rounds, inside, sent = [], [], []
        for r in range(a["warmup"] + a["rounds"]):
            with torch.no_grad():  # the "optimizer step", untimed: the head only
                policy["head"].add_(float(r + 1))
            before = tx.stats.bytes_sent
            t0 = time.perf_counter()
            tx.send_weights_async()
            t1 = time.perf_counter()
            tx.wait_ack(timeout=a["timeout"])
            if r >= a["warmup"]:
                rounds.append(time.perf_counter() - t0)
                inside.append(t1 - t0)
                sent.append(tx.stats.bytes_sent - before)
        _emit(report=True, rounds_s=rounds, async_s=inside, bytes=sent, version=tx.version,
              digest=_digest(policy, a["settings"].get("wire_dtype", "")),
              full_nbytes=tx.wire_layout.nbytes)
        tx.close()


def collector(a: dict[str, Any]) -> None:
    import torch

    from weight_sync import ConnectionInfo, WeightReceiver
    from weight_sync.errors import ClosedError

    torch.set_num_threads(1)
    policy = {k: torch.zeros_like(v) for k, v in _policy(a["numel"]).items()}
    info = ConnectionInfo.from_json(a["info"])
    with WeightReceiver(policy, info, 0, timeout=a["timeout"]) as rx:
        version = rx.connect(timeout=a["timeout"])
        deadline = time.monotonic() + a["timeout"] * (a["last"] + 1)
        try:
            while time.monotonic() < deadline:
                got = rx.receive_weights(timeout=a["timeout"])
                version = got if got is not None else version
        except ClosedError:
            pass
        _emit(report=True, version=version, digest=_digest(policy))


# -- the orchestrator ---------------------------------------------------------------------
def _block(bed: TestBed, series: str, a: dict[str, Any]) -> dict[str, Any]:
    procs = Procs(a["timeout"] * 3, module=_MODULE)
    try:
        home = bed.hosts[0]
        tx = procs.start(home, "learner", {**a, "address": home.address,
                                           "settings": SERIES[series]})
        info = procs.line(tx)["info"]
        last = a["warmup"] + a["rounds"]
        rx = procs.start(bed.hosts[1], "collector", {**a, "info": info, "last": last})
        rep = procs.line(tx, a["timeout"] * (last + 3))
        got = procs.line(rx)
    finally:
        procs.close()
    return {"rounds_s": rep["rounds_s"], "async_s": rep["async_s"], "bytes": rep["bytes"],
            "full_nbytes": rep["full_nbytes"],
            "correct": got["digest"] == rep["digest"] and got["version"] == last}


def _summary(blocks: list[dict[str, Any]]) -> dict[str, Any]:
    rounds = sorted(r for b in blocks for r in b["rounds_s"])
    return {"median_s": statistics.median(rounds),
            "p90_s": rounds[min(len(rounds) - 1, int(0.9 * len(rounds)))],
            "async_median_s": statistics.median(x for b in blocks for x in b["async_s"]),
            "bytes_median": statistics.median(x for b in blocks for x in b["bytes"]),
            "full_nbytes": blocks[0]["full_nbytes"], "rounds": len(rounds),
            "correct": all(b["correct"] for b in blocks)}


def run(args: argparse.Namespace, log: Any = print) -> dict[str, Any]:
    a = {"warmup": args.warmup, "rounds": args.rounds, "timeout": args.timeout,
         "numel": args.params}
    names = list(SERIES)
    report: dict[str, Any] = {"rate": args.rate, "params": args.params,
                              "nbytes": args.params * 4,
                              "wire_s": args.params * 4 * 8 / rate_bits(args.rate),
                              "blocks": args.blocks, "rounds": args.rounds,
                              "warmup": args.warmup, "orders": [], "series": {}}
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in names}
    with TestBed(hosts=2, rate=args.rate) as bed:
        for block in range(args.blocks):
            order = names if block % 2 == 0 else names[::-1]
            report["orders"].append(order)
            for series in order:
                t0 = time.monotonic()
                runs[series].append(_block(bed, series, a))
                med = statistics.median(runs[series][-1]["rounds_s"])
                log(f"block {block} {series}: {med * 1e3:.1f} ms "
                    f"({time.monotonic() - t0:.0f}s)")
    report["series"] = {s: {**_summary(runs[s]), "blocks": runs[s]} for s in names}
    return report


def table(report: dict[str, Any]) -> str:
    base = report["series"]["fp32"]["median_s"]
    lines = ["| wire format | round, median ms | p90 ms | vs fp32 | bytes per round | "
             "`send_weights_async` ms | correct |", "|" + "---|" * 7]
    for name, s in report["series"].items():
        lines.append(f"| {name} | {s['median_s'] * 1e3:.1f} | {s['p90_s'] * 1e3:.1f} | "
                     f"{s['median_s'] / base:.2f} | {s['bytes_median'] / 1e6:.1f} MB | "
                     f"{s['async_median_s'] * 1e3:.1f} | {s['correct']} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.wire_formats", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", type=int, default=25_000_000)
    p.add_argument("--rate", default="1gbit")
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--rounds", type=int, default=6, help="rounds per block")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--quick", action="store_true", help="2.5M params, 1 block of 2 rounds")
    p.add_argument("--results-dir", type=Path, default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("learner", "collector"):
        {"learner": learner, "collector": collector}[argv[0]](json.loads(argv[1]))
        return 0
    args = build_parser().parse_args(argv)
    reason = testbed.available()
    if reason is not None:
        print(f"benchmarks.wire_formats needs the test bed: {reason}", file=sys.stderr)
        return 2
    if args.quick:
        args.params, args.blocks, args.rounds = 2_500_000, 1, 2
    out_dir = args.results_dir or BENCH_DIR / "results" / ("quick" if args.quick else "")
    out_dir.mkdir(parents=True, exist_ok=True)
    report = run(args)
    report["command"] = " ".join(["python -m benchmarks.wire_formats", *argv])
    report["cpus"] = os.cpu_count()
    report["load_average"] = os.getloadavg()
    path = out_dir / f"wire_formats-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(report, indent=1))
    print(table(report))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
