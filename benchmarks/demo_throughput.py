"""The demo's batch throughput with local, Ray, remote (loopback) and remote (test-bed
hosts) collectors, and the cost of each batch channel per batch.

Demo runs: ``weight-sync demo --iterations I --seed S --quiet`` in its own process with

* ``local``: ``--launcher local`` (spawned processes, batches over pipes);
* ``ray``: ``--launcher ray`` (its own local Ray on 127.0.0.1, batches through the
  object store);
* ``network``: ``--launcher network --start-collectors`` (``python -m
  weight_sync.collectors.remote``
  processes on this host, batches over loopback TCP);
* ``hosts``: the learner on test-bed host 0 and the collectors on hosts 1.. (links
  shaped to 1 Gbit/s; :mod:`benchmarks.demo_hosts`), only where a bed can be built
  (root, iproute2) and unless ``--no-hosts``.

in an order rotated every round, ``--rounds`` rounds. Reported per mode: the demo's
frames/s (frames collected over the time from the group being up to the last
iteration: start-up excluded), sync p50 and the wall time. Then the channels alone
(:mod:`benchmarks.ray_channel`: one producer sends the same encoded CartPole batch of
``--frames-per-batch`` frames every 10 ms): end-to-end latency p50/p90 and the learner's
CPU time per batch, pipe vs object store vs network connection. Every process uses one
thread. Writes ``benchmarks/results/demo_throughput-<stamp>.json`` and prints a table.

    python -m benchmarks.demo_throughput --iterations 50 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
# Ray, in the demo's process and here: 127.0.0.1 only (read when Ray is first imported).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import testbed  # noqa: E402
from benchmarks import ray_channel  # noqa: E402
from benchmarks.demo_hosts import run_on_bed  # noqa: E402

__all__ = ["MODES", "main", "run_demo"]

MODES = ("local", "ray", "network", "hosts")
_ARGS = {"local": ["--launcher", "local"], "ray": ["--launcher", "ray"],
         "network": ["--launcher", "network", "--start-collectors"]}


def run_demo(mode: str, demo_args: list[str], timeout: float) -> dict[str, Any]:
    """One demo run; its JSON summary plus the load average around it."""
    load0 = os.getloadavg()[0]
    if mode == "hosts":
        result = run_on_bed(2, 2, demo_args, timeout=timeout)
        if result["returncode"] != 0 or result["demo"] is None:
            raise RuntimeError(f"demo on the test bed failed: {result['stderr']}")
        summary = result["demo"]["summary"]
    else:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "demo.json"
            run = subprocess.run(
                [sys.executable, "-m", "weight_sync.cli", "demo", *_ARGS[mode], "--quiet",
                 "--json-out", str(out), *demo_args], cwd=ROOT, env=env,
                capture_output=True, text=True, timeout=timeout)
            if run.returncode != 0:
                raise RuntimeError(f"demo --launcher {mode} failed ({run.returncode}): "
                                   f"{run.stderr[-3000:]}")
            summary = json.loads(out.read_text())["summary"]
    keep = ("fps", "total_frames", "wall_s", "sync_p50_ms", "sync_p99_ms", "staleness_mean",
            "first_avg_return", "last_avg_return", "collector_hosts")
    return {k: summary.get(k) for k in keep} | {"mode": mode, "load_before": load0,
                                                 "load_after": os.getloadavg()[0]}


def _median(runs: list[dict[str, Any]], key: str) -> float:
    return statistics.median(float(r[key]) for r in runs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--frames-per-batch", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--no-hosts", action="store_true", help="skip the test-bed mode")
    parser.add_argument("--channel-batches", type=int, default=200)
    parser.add_argument("--timeout", type=float, default=600.0, help="per demo run")
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args(argv)
    modes = [m for m in args.modes if not (m == "hosts" and args.no_hosts)]
    skipped = {}
    if "hosts" in modes and (reason := testbed.available()) is not None:
        modes.remove("hosts")
        skipped["hosts"] = reason
    demo_args = ["--iterations", str(args.iterations), "--seed", str(args.seed),
                 "--frames-per-batch", str(args.frames_per_batch)]
    started = time.time()
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    for r in range(args.rounds):
        for mode in modes[r % len(modes):] + modes[:r % len(modes)]:
            runs[mode].append(run_demo(mode, demo_args, args.timeout))
            print(f"round {r + 1} {mode}: {runs[mode][-1]['fps']:.0f} frames/s", flush=True)
    channels = ray_channel.run(list(ray_channel.CHANNELS), args.frames_per_batch,
                               args.channel_batches, 0.010, args.rounds)
    result = {"argv": sys.argv[1:] if argv is None else argv, "started": started,
              "wall_s": time.time() - started, "cpus": os.cpu_count(), "skipped": skipped,
              "demo": runs, "channels": channels}
    out = args.json_out or ROOT / "benchmarks" / "results" / time.strftime(
        "demo_throughput-%Y%m%d-%H%M%S.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print("\n| mode | frames/s (runs) | median | sync p50 ms | load avg |\n|---|---|---|---|---|")
    for mode, mruns in runs.items():
        fps = " / ".join(f"{r['fps']:.0f}" for r in mruns)
        load = " / ".join(f"{r['load_before']:.1f}" for r in mruns)
        print(f"| {mode} | {fps} | {_median(mruns, 'fps'):.0f} | "
              f"{_median(mruns, 'sync_p50_ms'):.1f} | {load} |")
    print("\n| channel | end to end p50 / p90 µs | learner CPU µs/batch |\n|---|---|---|")
    for channel, cruns in channels.items():
        print(f"| {channel} | {_median(cruns, 'e2e_p50_us'):.0f} / "
              f"{_median(cruns, 'e2e_p90_us'):.0f} | {_median(cruns, 'learner_cpu_us'):.0f} |")
    print(f"\nwritten to {out}")
    for mode, reason in skipped.items():
        print(f"{mode}: skipped ({reason})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
