"""``weight-sync bench``: weight-sync's round latency next to torchrl, Ray and the raw limit.

For every configuration (leaf kind x policy size x N collectors) one run measures, in
an order rotated from one configuration to the next: weight-sync's round
(``benchmarks.sync_latency``) with no settings (``default``: the README's first example,
``WeightSender(policy, num_collectors=N)``, no transport keyword) and with each forced
transport (``distributed``, ``shm``, ``relay``; any registered name or ``auto`` with
``--transports``), torchrl's ``DistributedWeightSyncScheme`` on the same policy and N,
the Ray object store (``benchmarks.ray_baseline``: ``ray.put`` once per version, N actors
``ray.get`` and load it), one flat tensor of the same bytes over raw gloo, and an
in-process memcpy of the same bytes (``benchmarks.baselines``). All processes are
real (spawn, or Ray actors), learner and collectors run ``torch.set_num_threads(1)``,
ports come from port 0, every child is reaped. Results go to JSON (``--results-dir``:
``bench-<stamp>.json`` and ``latest.json``), then ``benchmarks.report`` renders
``RESULTS.md`` and plots (``--report-dir``) unless ``--no-report``. By default a full
run writes ``benchmarks/results/``: JSON, and the committed ``RESULTS.md`` and plots;
a ``--quick`` run writes all of it under ``benchmarks/results/quick/`` instead (ignored
by git), so it never overwrites the full results. A global ``--budget-s`` skips the
configurations that would overrun it, with the reason recorded.

    weight-sync bench                      # full sweep (~15 min on 2 cores)
    weight-sync bench --quick              # 100K + 1M, N=1,2, few rounds (< 2 min)
    weight-sync bench --sizes 1000000 --kinds deep --collectors 4 --rounds 50
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import shlex
import sys
import time
import traceback
from collections.abc import Callable
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from benchmarks import baselines, policies, ray_baseline
from benchmarks.sync_latency import measure_weight_sync
from weight_sync.config import SenderConfig
from weight_sync.transports import transport_names
from weight_sync.transports.registry import AUTO

__all__ = ["BASELINES", "DEFAULT_TRANSPORTS", "QUICK_DIR", "TRANSPORTS", "default_dirs",
           "machine_info", "main", "run_sweep"]

BENCH_DIR = Path(__file__).resolve().parent
QUICK_DIR = BENCH_DIR / "results" / "quick"
"""Default results and report directory of ``--quick`` runs (under the ignored results/)."""
SIZES = (100_000, 1_000_000, 10_000_000, 100_000_000)
QUICK_SIZES = (100_000, 1_000_000)
TRANSPORTS: dict[str, Callable[..., dict[str, Any]]] = {
    "default": measure_weight_sync,
    **{name: functools.partial(measure_weight_sync, transport=name)
       for name in sorted({*transport_names(), AUTO})},
}
"""weight-sync series, name -> ``measure(params, kind, n, rounds, warmup, timeout)``; the
JSON names each ``weight_sync/<name>``. ``default`` passes no transport (what a user with
no settings gets); every other name forces that transport."""
DEFAULT_TRANSPORTS = ("default", "distributed", "shm", "relay")
"""The weight-sync series a run measures unless ``--transports`` says otherwise."""
BASELINES = ("torchrl", "ray", "raw_gloo", "memcpy")
"""The comparison points, in the JSON by these names."""
BUILD_S_PER_PARAM = 1e-8
"""Rough cost of building one parameter in a process (for the budget estimate only)."""
ASSUMED_GBPS = 1.0
"""Conservative per-collector transfer rate for the budget estimate (loopback gloo)."""


def default_dirs(quick: bool) -> tuple[Path, Path]:
    """``(results_dir, report_dir)`` when not given: a quick run keeps to :data:`QUICK_DIR`,
    away from the full run's ``latest.json``, ``RESULTS.md`` and plots."""
    if quick:
        return QUICK_DIR, QUICK_DIR
    return BENCH_DIR / "results", BENCH_DIR / "results"


def default_rounds(params: int, quick: bool) -> tuple[int, int]:
    """``(rounds, warmup)`` for a policy size: fewer rounds where one round is long."""
    if quick:
        return 5, 1
    if params <= 2_000_000:
        return 30, 3
    if params <= 20_000_000:
        return 15, 2
    return 5, 1


def machine_info() -> dict[str, Any]:
    """CPU model, cores, memory, library versions, python, platform and date."""
    cpu = "unknown"
    mem_kb = 0
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_kb = int(line.split()[1])
    except OSError:
        pass
    versions: dict[str, str | None] = {}
    for pkg in ("torch", "torchrl", "tensordict", "ray", "numpy", "weight-sync"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {
        "cpu_model": cpu,
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_gib": round(mem_kb / 2**20, 1),
        "versions": {**versions, "torch_runtime": torch.__version__},
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "hostname": platform.node(),
        "loadavg_start": _loadavg(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _command_line(argv: list[str]) -> str:
    """The command as typed: ``weight-sync bench ...`` or ``python -m benchmarks.bench ...``."""
    if Path(sys.argv[0]).name == "weight-sync":
        return shlex.join(["weight-sync", *sys.argv[1:]])
    if Path(sys.argv[0]).resolve() == Path(__file__).resolve():
        return shlex.join(["python", "-m", "benchmarks.bench", *argv])
    return f"benchmarks.bench.main({argv!r})"


def _thread_settings() -> dict[str, Any]:
    env = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
    return {
        "policy": "learner and every collector/worker process (Ray actors too: num_cpus=1) "
                  "torch.set_num_threads(1) during measurement (the learner's setting is "
                  "restored afterwards)",
        "parent_torch_threads": torch.get_num_threads(),
        "env": {k: os.environ.get(k) for k in env},
    }


def _shape(params: int, kind: str) -> dict[str, int]:
    """Exact params/leaves/bytes of a policy, built on the meta device (no memory)."""
    with torch.device("meta"):
        module = policies.make_policy(params, kind)
    return {"params": policies.count_params(module), "leaves": policies.count_leaves(module),
            "nbytes": policies.count_bytes(module)}


def _parse_skips(entries: list[str]) -> list[tuple[str, int]]:
    out = []
    for entry in entries:
        kind, _, size = entry.partition(":")
        out.append((kind, int(float(size))))
    return out


def _measure(thing: str, cfg: dict[str, Any], timeout: float) -> dict[str, Any]:
    p, kind, n = cfg["params_target"], cfg["kind"], cfg["num_collectors"]
    rounds, warmup, nbytes = cfg["rounds"], cfg["warmup"], cfg["nbytes"]
    if thing.startswith("weight_sync/"):
        return TRANSPORTS[thing.split("/", 1)[1]](p, kind, n, rounds, warmup, timeout)
    if thing == "torchrl":
        res = baselines.measure_torchrl(p, kind, n, rounds, warmup, timeout)
        res.pop("method", None)
        return res
    if thing == "ray":
        res = ray_baseline.measure_ray(p, kind, n, rounds, warmup, timeout)
        res.pop("method", None)
        return res
    if thing == "raw_gloo":
        res = baselines.measure_raw_gloo(nbytes, n, rounds, warmup, timeout, include_n1=False)
        res.pop("method", None)
        return res
    return baselines.measure_memcpy(nbytes, rounds, warmup)


def _estimate(cfg: dict[str, Any], things: list[str], done: list[dict[str, Any]]) -> float:
    """Rough seconds a configuration will take, from the closest finished one.

    Per compared thing: a reference measurement of the same kind (same N and the
    largest smaller size, else same size and the largest smaller N). A round is
    predicted as the reference's median scaled by N plus the extra bytes at
    ``ASSUMED_GBPS`` per collector (additive: small rounds are dominated by fixed
    costs, not bytes); setup as the reference's overhead scaled by the process
    count plus the policy builds. Returns 0 when nothing comparable has run yet.
    """
    total = 0.0
    n, nbytes = cfg["num_collectors"], cfg["nbytes"]
    for thing in things:
        refs = [(d, d["results"][thing]) for d in done
                if d["kind"] == cfg["kind"] and thing in d.get("results", {})]
        same_n = [r for r in refs if r[0]["num_collectors"] == n and r[0]["nbytes"] <= nbytes]
        same_p = [r for r in refs if r[0]["nbytes"] == nbytes and r[0]["num_collectors"] <= n]
        pool = same_n or same_p
        if not pool:
            continue
        ref_cfg, ref = max(pool, key=lambda r: (r[0]["nbytes"], r[0]["num_collectors"]))
        procs = 1.0 if thing == "memcpy" else (n + 1) / (ref_cfg["num_collectors"] + 1)
        lanes = 1 if thing == "memcpy" else n
        gbps = ASSUMED_GBPS * (5 if thing == "memcpy" else 1)
        per_round = (ref["median_s"] * (lanes / (1 if thing == "memcpy" else
                                                   ref_cfg["num_collectors"]))
                     + (nbytes - ref_cfg["nbytes"]) * lanes / (gbps * 1e9))
        overhead = max(0.0, ref["wall_s"] - (ref_cfg["rounds"] + ref_cfg["warmup"])
                       * ref["median_s"]) * procs
        build = 0.0 if thing == "memcpy" else \
            BUILD_S_PER_PARAM * (cfg["params"] - ref_cfg["params"]) * (n + 1)
        total += overhead + build + (cfg["rounds"] + cfg["warmup"]) * per_round
    return total


def _finish(cfg: dict[str, Any], transports: list[str]) -> None:
    """Add ratios and correctness flags to a measured configuration."""
    res = cfg["results"]
    cfg["correct"] = {k: bool(v.get("correct", True)) for k, v in res.items()}
    cfg["ratios"] = {}
    for name in transports:
        ours = res.get(f"weight_sync/{name}")
        if ours is None:
            continue
        cfg["ratios"][name] = {
            f"to_{other}": ours["median_s"] / res[other]["median_s"]
            for other in BASELINES if other in res
        }
        if "memcpy" in res:
            cfg["ratios"][name]["async_to_memcpy"] = (ours["async_median_s"]
                                                      / res["memcpy"]["median_s"])
        if ours.get("memcpy_in_round_median_s"):
            cfg["ratios"][name]["async_to_memcpy_in_round"] = (
                ours["async_median_s"] / ours["memcpy_in_round_median_s"])


def run_sweep(args: argparse.Namespace, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure every configuration of ``args``; return the JSON-ready report."""
    t_start = time.monotonic()
    machine = machine_info()
    skips = _parse_skips(args.skip_torchrl)
    things = [f"weight_sync/{t}" for t in args.transports] + list(args.baselines)
    configs: list[dict[str, Any]] = []
    done: list[dict[str, Any]] = []
    index = 0
    for kind in args.kinds:
        for size in args.sizes:
            shape = _shape(size, kind)
            for n in args.collectors:
                rounds, warmup = default_rounds(size, args.quick)
                cfg: dict[str, Any] = {
                    "kind": kind, "params_target": size, **shape, "num_collectors": n,
                    "rounds": args.rounds or rounds,
                    "warmup": warmup if args.warmup is None else args.warmup,
                }
                shift = index % len(things)
                order = things[shift:] + things[:shift]
                index += 1
                skipped = {t: f"--skip-torchrl {k}:{s}" for t in ["torchrl"]
                           for k, s in skips if k == kind and size >= s}
                order = [t for t in order if t not in skipped]
                cfg.update(order=order, skipped=skipped)
                label = f"{kind:>4} {shape['params']:>11,} params N={n}"
                elapsed = time.monotonic() - t_start
                est = _estimate(cfg, order, done)
                if elapsed + est > args.budget_s:
                    cfg.update(status="skipped", estimate_s=est,
                               reason=f"budget: {elapsed:.0f}s spent + ~{est:.0f}s estimated "
                                      f"> --budget-s {args.budget_s:.0f}")
                    log(f"{label}: skipped ({cfg['reason']})")
                    configs.append(cfg)
                    continue
                cfg["results"], cfg["status"], t0 = {}, "ok", time.monotonic()
                for thing in order:
                    t1 = time.monotonic()
                    try:
                        res = _measure(thing, cfg, args.timeout)
                    except Exception as exc:  # record, go on with the rest of the sweep
                        cfg["status"] = "error"
                        cfg.setdefault("errors", {})[thing] = "".join(
                            traceback.format_exception_only(type(exc), exc)).strip()
                        log(f"{label}: {thing} FAILED: {cfg['errors'][thing]}")
                        log(traceback.format_exc())
                        continue
                    res["wall_s"] = time.monotonic() - t1
                    if not args.samples:
                        res.pop("samples_s", None)
                    cfg["results"][thing] = res
                cfg.update(wall_s=time.monotonic() - t0, estimate_s=est)
                _finish(cfg, args.transports)
                done.append(cfg)
                configs.append(cfg)
                log(_progress(label, cfg, args.transports))
    flags = [ok for c in configs for ok in c.get("correct", {}).values()]
    return {
        "benchmark": "weight-sync bench", "schema": 1,
        "command": _command_line(args.argv),
        "argv": list(args.argv),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {**machine, "loadavg_end": _loadavg()},
        "threads": _thread_settings(),
        "settings": {k: v for k, v in vars(args).items() if k != "argv"},
        "rounds_note": "rounds/warmup per config: --rounds/--warmup if given, else "
                       + ("5/1 (quick)" if args.quick
                          else "30/3 up to 2M params, 15/2 up to 20M, 5/1 above"),
        "default_transport": SenderConfig().transport,
        "torchrl_method": baselines.TORCHRL_METHOD,
        "ray_method": ray_baseline.RAY_METHOD,
        "configs": configs,
        "total_wall_s": time.monotonic() - t_start,
        "all_correct": all(flags),
        "errors": sum(c["status"] == "error" for c in configs),
        "skipped": sum(c["status"] == "skipped" for c in configs),
    }


def _progress(label: str, cfg: dict[str, Any], transports: list[str]) -> str:
    res = cfg["results"]

    def ms(thing: str) -> str:
        return f"{res[thing]['median_s'] * 1e3:8.2f}" if thing in res else "     n/a"

    parts = [f"ws/{t} {ms('weight_sync/' + t)} ms" for t in transports]
    parts += [f"{b} {ms(b)}" for b in BASELINES if b in res]
    ok = all(cfg["correct"].values())
    return f"{label}: {' | '.join(parts)}  correct={ok}  wall {cfg['wall_s']:.1f}s"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="weight-sync bench", description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="100K and 1M params, N=1,2, 5 rounds (< 2 minutes)")
    parser.add_argument("--sizes", type=lambda s: int(float(s)), nargs="+", default=None,
                        help="target parameter counts (default 1e5 1e6 1e7 1e8)")
    parser.add_argument("--kinds", nargs="+", choices=policies.KINDS, default=list(policies.KINDS))
    parser.add_argument("--collectors", type=int, nargs="+", default=None,
                        help="values of N (default 1 2 4, plus 8 with --max-collectors 8)")
    parser.add_argument("--max-collectors", type=int, default=4,
                        help="largest default N, doubling from 1 (default 4)")
    parser.add_argument("--transports", nargs="+", choices=sorted(TRANSPORTS),
                        default=list(DEFAULT_TRANSPORTS),
                        help="weight-sync series to measure: 'default' (no transport "
                             "keyword) and forced transports (default: %(default)s)")
    parser.add_argument("--baselines", nargs="*", choices=BASELINES, default=list(BASELINES),
                        help="comparison points to measure (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (all configs)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds (all configs)")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="bound on every wait of a measurement, seconds")
    parser.add_argument("--budget-s", type=float, default=900.0,
                        help="skip the configs that would end the sweep past this many seconds")
    parser.add_argument("--skip-torchrl", nargs="*", default=[], metavar="KIND:PARAMS",
                        help="skip torchrl for KIND at sizes >= PARAMS, e.g. deep:1e8")
    parser.add_argument("--samples", action="store_true", help="keep per-round samples in JSON")
    parser.add_argument("--results-dir", type=Path, default=None,
                        help="where bench-<stamp>.json and latest.json go (default "
                             "benchmarks/results/; with --quick benchmarks/results/quick/)")
    parser.add_argument("--json-out", type=Path, default=None,
                        help="dated JSON path (default RESULTS_DIR/bench-<stamp>.json)")
    parser.add_argument("--report-dir", type=Path, default=None,
                        help="where RESULTS.md and the plots go (default benchmarks/results/; "
                             "with --quick benchmarks/results/quick/)")
    parser.add_argument("--no-report", action="store_true", help="do not render RESULTS.md")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the sweep; returns 0 when every measurement ran and every flag is correct."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    if args.sizes is None:
        args.sizes = list(QUICK_SIZES if args.quick else SIZES)
    if args.collectors is None:
        top = 2 if args.quick else args.max_collectors
        args.collectors = [n for n in (1, 2, 4, 8, 16) if n <= top]
    results_default, report_default = default_dirs(args.quick)
    args.results_dir = args.results_dir or results_default
    args.report_dir = args.report_dir or report_default
    for key in ("results_dir", "json_out", "report_dir"):
        value = getattr(args, key)
        setattr(args, key, None if value is None else str(value))
    report = run_sweep(args)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    results_dir = Path(args.results_dir)
    dated = Path(args.json_out) if args.json_out else results_dir / f"bench-{stamp}.json"
    text = json.dumps(report, indent=1)
    for path in (dated, results_dir / "latest.json"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    print(f"wrote {dated} and {results_dir / 'latest.json'} "
          f"(total {report['total_wall_s']:.0f}s, all_correct={report['all_correct']}, "
          f"errors={report['errors']}, skipped={report['skipped']})", flush=True)
    if not args.no_report:
        from benchmarks.report import display_path, render

        for path in render(report, Path(args.report_dir), json_path=display_path(dated)):
            print(f"wrote {path}", flush=True)
    return 0 if report["all_correct"] and not report["errors"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
