"""``collector.update_policy_weights_()`` inside torchrl's ``MultiSyncCollector``:
weight-sync's :class:`~weight_sync.torchrl.WeightSyncTorchRLScheme` against the
collector's default ``SharedMemWeightSyncScheme``.

For every configuration (leaf kind x policy size x N workers) one run measures, in an
order rotated from one configuration to the next: the weight-sync scheme over
``"distributed"`` (gloo) and over ``"shm"``, and torchrl's ``SharedMemWeightSyncScheme``
(what ``MultiSyncCollector`` uses when given no scheme). Each builds a real
``MultiSyncCollector`` with N spawned workers on CartPole (``GymEnv``) whose policy is
a benchmark policy (``benchmarks.policies``: 8-leaf "wide" or 298-leaf "deep"; the
4-dim observation is tiled to its 64 inputs). A round: the learner perturbs one leaf
(untimed), then ``collector.update_policy_weights_()`` is timed with
``time.perf_counter``. After the last round every worker's policy (read back with
``collector.state_dict()``) is compared bit for bit with the learner's: ``correct``;
then the learner changes a leaf *without* an update, and ``aliased`` records whether a
worker sees it anyway (its policy reads the learner's own tensors: on CPU,
``SharedMemWeightSyncScheme`` moves the learner's weights into shared memory and maps
them into the workers, so an update moves no bytes, and workers see every optimizer
step as it happens, also in the middle of a policy call).
The learner runs ``torch.set_num_threads(1)``, as do torchrl's workers.

    python -m benchmarks.torchrl_scheme            # 1M and 10M params, N=2,4, both kinds
    python -m benchmarks.torchrl_scheme --quick    # 100K params, N=2, 5 rounds (~1 min)

JSON goes to ``benchmarks/results/torchrl_scheme-<stamp>.json`` (``--quick``:
``benchmarks/results/quick/``); a markdown table is printed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from tensordict.nn import TensorDictModule
from torch import nn

from benchmarks import policies
from benchmarks.bench import BENCH_DIR, QUICK_DIR, machine_info

__all__ = ["BenchActor", "main", "measure"]

SIZES = (1_000_000, 10_000_000)
WORKERS = (2, 4)
THINGS = ("weight_sync/distributed", "weight_sync/shm", "torchrl/shared_mem")
"""What is measured: our scheme per transport, torchrl's default for MultiSync."""


class BenchActor(nn.Module):
    """A benchmark policy acting in CartPole: the observation tiled to its 64 inputs,
    the action the argmax of its first two outputs."""

    def __init__(self, params: int, kind: str) -> None:
        super().__init__()
        self.net = policies.make_policy(params, kind)

    def forward(self, observation: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = observation.float().repeat(*([1] * (observation.dim() - 1)),
                                       policies.OBS_DIM // observation.shape[-1])
        logits = self.net(x)
        return logits, logits[..., :2].argmax(-1)


def make_actor(params: int, kind: str) -> TensorDictModule:
    actor = TensorDictModule(BenchActor(params, kind), in_keys=["observation"],
                             out_keys=["logits", "action"])
    for p in actor.parameters():
        p.requires_grad_(False)
    return actor


def make_env() -> Any:
    from torchrl.envs import GymEnv

    return GymEnv("CartPole-v1", categorical_action_encoding=True)


def _scheme(thing: str, timeout: float) -> Any:
    if thing == "torchrl/shared_mem":
        from torchrl.weight_update import SharedMemWeightSyncScheme

        return SharedMemWeightSyncScheme()
    from weight_sync.torchrl import WeightSyncTorchRLScheme

    return WeightSyncTorchRLScheme(transport=thing.split("/", 1)[1], timeout=timeout,
                                   ack_timeout=timeout)


def measure(thing: str, params: int, kind: str, workers: int, rounds: int, warmup: int,
            timeout: float) -> dict[str, Any]:
    """Time ``update_policy_weights_()`` of one scheme on one collector."""
    from torchrl.collectors import MultiSyncCollector

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    actor = make_actor(params, kind)
    scheme = _scheme(thing, timeout)
    start = time.monotonic()
    collector = MultiSyncCollector([make_env] * workers, policy=actor,
                                   frames_per_batch=8 * workers, total_frames=-1,
                                   weight_sync_schemes={"policy": scheme})
    setup_s = time.monotonic() - start
    leaf = next(actor.parameters())
    samples = []
    try:
        for r in range(warmup + rounds):
            with torch.no_grad():
                leaf.add_(1.0)  # the weights change every round
            t0 = time.perf_counter()
            collector.update_policy_weights_()
            dt = time.perf_counter() - t0
            if r >= warmup:
                samples.append(dt)
        correct = _workers_hold(collector, actor, workers)
        with torch.no_grad():
            leaf.add_(1.0)  # not sent: a worker that sees it reads the learner's tensors
        aliased = _workers_hold(collector, actor, workers, every=False)
    finally:
        t0 = time.monotonic()
        collector.shutdown(timeout=30.0, raise_on_error=False)
        scheme.shutdown()
        shutdown_s = time.monotonic() - t0
        torch.set_num_threads(threads)
    ordered = sorted(samples)
    return {
        "median_s": statistics.median(samples),
        "p90_s": ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))],
        "min_s": ordered[0], "mean_s": statistics.fmean(samples), "samples_s": samples,
        "correct": bool(correct), "aliased": bool(aliased), "setup_s": setup_s,
        "shutdown_s": shutdown_s,
    }


def _workers_hold(collector: Any, actor: nn.Module, workers: int, every: bool = True) -> bool:
    """Whether every (or any) worker's policy equals the learner's, bit for bit."""
    learner = actor.state_dict()
    sd = collector.state_dict()
    same = [sd[f"worker{w}"]["policy_state_dict"].keys() == learner.keys()
            and all(torch.equal(sd[f"worker{w}"]["policy_state_dict"][k], v)
                    for k, v in learner.items())
            for w in range(workers)]
    return all(same) if every else any(same)


def _shape(params: int, kind: str) -> dict[str, int]:
    with torch.device("meta"):
        module = policies.make_policy(params, kind)
    return {"params": policies.count_params(module), "leaves": policies.count_leaves(module),
            "nbytes": policies.count_bytes(module)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    t_start = time.monotonic()
    configs = []
    index = 0
    for kind in args.kinds:
        for size in args.sizes:
            for n in args.workers:
                shift = index % len(args.things)
                order = list(args.things[shift:]) + list(args.things[:shift])
                index += 1
                rounds = args.rounds or (5 if args.quick else 30 if size <= 2_000_000 else 15)
                warmup = 1 if args.quick else 3
                cfg: dict[str, Any] = {"kind": kind, "params_target": size,
                                       **_shape(size, kind), "num_workers": n,
                                       "rounds": rounds, "warmup": warmup, "order": order,
                                       "results": {}, "errors": {}}
                for thing in order:
                    try:
                        cfg["results"][thing] = measure(thing, size, kind, n, rounds, warmup,
                                                        args.timeout)
                    except Exception as exc:
                        cfg["errors"][thing] = "".join(
                            traceback.format_exception_only(type(exc), exc)).strip()
                        print(traceback.format_exc(), file=sys.stderr, flush=True)
                res = cfg["results"]
                base = res.get("torchrl/shared_mem")
                cfg["speedup_vs_torchrl"] = {
                    t: base["median_s"] / r["median_s"] for t, r in res.items()
                    if base is not None and t != "torchrl/shared_mem"}
                configs.append(cfg)
                print(_line(cfg), flush=True)
    flags = [r["correct"] for c in configs for r in c["results"].values()]
    return {
        "benchmark": "torchrl scheme: update_policy_weights_() in MultiSyncCollector",
        "command": "python -m benchmarks.torchrl_scheme " + " ".join(args.argv),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "method": __doc__.split("\n\n")[1].replace("\n", " "),
        "configs": configs, "total_wall_s": time.monotonic() - t_start,
        "all_correct": all(flags),
        "errors": sum(len(c["errors"]) for c in configs),
    }


def _ms(res: dict[str, Any], thing: str) -> str:
    r = res.get(thing)
    return "-" if r is None else f"{r['median_s'] * 1e3:.2f}"


def _line(cfg: dict[str, Any]) -> str:
    res = cfg["results"]
    parts = " | ".join(f"{t} {_ms(res, t)} ms" for t in THINGS)
    aliased = [t for t, r in res.items() if r["aliased"]]
    return (f"{cfg['kind']:>4} {cfg['params']:>11,} params N={cfg['num_workers']}: {parts}  "
            f"correct={all(r['correct'] for r in res.values())} aliased={aliased}")


def table(report: dict[str, Any]) -> str:
    """The README table: median ms of update_policy_weights_(), and torchrl / ours."""
    lines = ["| policy | params | N | weight-sync gloo | weight-sync shm | torchrl SharedMem "
             "| torchrl / best ours | workers aliased to the learner (ours / torchrl) | correct |",
             "|---|---|---|---|---|---|---|---|---|"]
    for cfg in report["configs"]:
        res = cfg["results"]
        ours = [res[t]["median_s"] for t in THINGS[:2] if t in res]
        base = res.get("torchrl/shared_mem")
        ratio = f"{base['median_s'] / min(ours):.1f}x" if base and ours else "-"
        name = f"{cfg['kind']} ({cfg['leaves']} leaves)"
        ours_aliased = any(res[t]["aliased"] for t in THINGS[:2] if t in res)
        theirs = "-" if base is None else ("yes" if base["aliased"] else "no")
        lines.append(f"| {name} | {cfg['params'] / 1e6:.1f}M | {cfg['num_workers']} | "
                     f"{_ms(res, THINGS[0])} | {_ms(res, THINGS[1])} | {_ms(res, THINGS[2])} "
                     f"| {ratio} | {'yes' if ours_aliased else 'no'} / {theirs} "
                     f"| {all(r['correct'] for r in res.values())} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.torchrl_scheme",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="100K params, N=2, 5 rounds")
    parser.add_argument("--sizes", type=lambda s: int(float(s)), nargs="+", default=None)
    parser.add_argument("--kinds", nargs="+", choices=policies.KINDS, default=list(policies.KINDS))
    parser.add_argument("--workers", type=int, nargs="+", default=None)
    parser.add_argument("--things", nargs="+", choices=THINGS, default=list(THINGS))
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="bound on every wait of our scheme, seconds")
    parser.add_argument("--json-out", type=Path, default=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    args.sizes = args.sizes or ([100_000] if args.quick else list(SIZES))
    args.workers = args.workers or ([2] if args.quick else list(WORKERS))
    report = run(args)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    out = args.json_out or (QUICK_DIR if args.quick else BENCH_DIR / "results") / \
        f"torchrl_scheme-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(table(report))
    print(f"wrote {out} (total {report['total_wall_s']:.0f}s, "
          f"all_correct={report['all_correct']}, errors={report['errors']})", flush=True)
    return 0 if report["all_correct"] and not report["errors"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
