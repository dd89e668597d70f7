"""``collector.update_policy_weights_()`` inside torchrl's ``MultiSyncCollector``:
weight-sync's :class:`~weight_sync.torchrl.WeightSyncTorchRLScheme` against the
collector's default ``SharedMemWeightSyncScheme``.

For every configuration (leaf kind x policy size x N workers) one run measures, in an
order rotated from one configuration to the next: the weight-sync scheme with its
default transport (no keyword), over ``"distributed"`` (gloo) and over ``"shm"``, and
torchrl's ``SharedMemWeightSyncScheme``
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

``--collector distributed`` measures ``update_policy_weights_()`` of torchrl's
``DistributedCollector`` instead (``launcher="mp"``, N nodes on this host, ``sync=True``,
CPU, gloo, one ``Collector`` per node, ``policy_factory`` building the same benchmark
policy on each node): the weight-sync scheme over ``"distributed"`` and ``"shm"`` against
``DistributedWeightSyncScheme`` (what ``DistributedCollector`` uses when given no
scheme), same rounds and order rotation (a round changes one leaf by a small random step
rather than ``+= 1.0``, see below). ``DistributedCollector.state_dict()`` raises
``NotImplementedError``, so node weights cannot be read back: ``correct`` is ``null``
(with ``correct_reason``), and instead one batch is collected after the last round and
its ``logits`` are compared with the learner's policy applied to its observations:
``acted_with_learner``, bit for bit with a per-frame forward (the shape a node's
``Collector`` calls its policy with) run with 1 thread or the nodes' default thread count
(``acted_with_learner_threads``: which matched; the thread count changes the rounding of
the deep 1M policy; also recorded: ``acted_close_batched``, within 1e-5 of one batched
forward, which the deep policy's rounding can fail); then the leaf steps without an
update and ``aliased`` records whether the next batch acted with it. Every measurement is
bounded by a watchdog that kills the nodes; ``collector.shutdown()`` runs in a thread
bounded by ``--shutdown-timeout`` and its time is recorded as ``shutdown_s``.

    python -m benchmarks.torchrl_scheme --collector distributed --workers 2 --rounds 10

JSON: ``benchmarks/results/torchrl_scheme_distributed-<stamp>.json``.

``--collector unified`` builds torchrl's unified ``Collector(make_env, policy=,
num_collectors=N, sync=True)`` (a ``MultiSyncCollector`` underneath) instead of naming
``MultiSyncCollector``; everything else as the default run. JSON:
``benchmarks/results/torchrl_scheme_unified-<stamp>.json``.
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing
import socket
import statistics
import sys
import threading
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

__all__ = ["BenchActor", "main", "measure", "measure_distributed"]

SIZES = (1_000_000, 10_000_000)
WORKERS = (2, 4)
THINGS = ("weight_sync/default", "weight_sync/distributed", "weight_sync/shm",
          "torchrl/shared_mem")
"""What is measured: our scheme with its default transport (no keyword) and per
transport, and torchrl's default for MultiSync (last: the baseline)."""
DIST_THINGS = ("weight_sync/default", "weight_sync/distributed", "weight_sync/shm",
               "torchrl/distributed")
"""With ``--collector distributed``: torchrl's default is ``DistributedWeightSyncScheme``."""


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
    if thing == "torchrl/distributed":
        from torchrl.weight_update import DistributedWeightSyncScheme

        # DistributedCollector's own default, with its store waits bounded like ours
        return DistributedWeightSyncScheme(backend="gloo", sync=True, timeout=timeout)
    from weight_sync.torchrl import WeightSyncTorchRLScheme

    transport = thing.split("/", 1)[1]
    if transport == "default":  # as a newcomer writes it: no transport keyword
        return WeightSyncTorchRLScheme(timeout=timeout, ack_timeout=timeout)
    return WeightSyncTorchRLScheme(transport=transport, timeout=timeout, ack_timeout=timeout)


def measure(thing: str, params: int, kind: str, workers: int, rounds: int, warmup: int,
            timeout: float, unified: bool = False) -> dict[str, Any]:
    """Time ``update_policy_weights_()`` of one scheme on one collector: a
    ``MultiSyncCollector``, or (``unified``) torchrl's unified
    ``Collector(make_env, policy=, num_collectors=N, sync=True)``."""
    from torchrl.collectors import Collector, MultiSyncCollector

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    actor = make_actor(params, kind)
    scheme = _scheme(thing, timeout)
    start = time.monotonic()
    if unified:
        collector = Collector(make_env, policy=actor, num_collectors=workers, sync=True,
                              frames_per_batch=8 * workers, total_frames=-1,
                              weight_sync_schemes={"policy": scheme})
    else:
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


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _kill_jobs(collector: Any, spawned: Any = ()) -> None:
    """Kill the collector's nodes, and any process spawned since (a constructor that
    failed or hung leaves no collector to ask)."""
    jobs = list(getattr(collector, "jobs", None) or [])
    for job in jobs + [p for p in spawned if p not in jobs]:
        if job.is_alive():
            job.kill()
        job.join(5.0)


def _logits_of(actor: TensorDictModule, observation: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return actor.module(observation)[0]


def _acted_with(batch: Any, actor: TensorDictModule, node_threads: int
                ) -> tuple[bool, int | None, bool]:
    """Whether every frame of ``batch`` acted with the learner's current weights: bit for
    bit with a per-frame forward (the shape a node's ``Collector`` calls its policy with)
    run with 1 thread or with ``node_threads`` (the nodes' torch default; the thread count
    changes the rounding of some policies), which of them matched, and whether it is within
    1e-5 of one batched forward (as in the tests)."""
    got = batch["logits"]
    close = bool(torch.allclose(got, _logits_of(actor, batch["observation"]),
                                rtol=1e-5, atol=1e-5))
    obs = batch["observation"].reshape(-1, batch["observation"].shape[-1])
    threads = torch.get_num_threads()
    try:
        for n in dict.fromkeys((1, node_threads)):
            torch.set_num_threads(n)
            per_frame = torch.stack([_logits_of(actor, o) for o in obs])
            if torch.equal(got.reshape(per_frame.shape), per_frame):
                return True, n, close
    finally:
        torch.set_num_threads(threads)
    return False, None, close


def measure_distributed(thing: str, params: int, kind: str, workers: int, rounds: int,
                        warmup: int, timeout: float, shutdown_timeout: float
                        ) -> dict[str, Any]:
    """Time ``update_policy_weights_()`` of one scheme on a ``DistributedCollector``
    (launcher="mp", ``workers`` nodes, sync, CPU, gloo)."""
    from torchrl.collectors import Collector
    from torchrl.collectors.distributed import DistributedCollector

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    actor = make_actor(params, kind)
    scheme = _scheme(thing, timeout)
    holder: dict[str, Any] = {}
    expired = threading.Event()
    before = set(multiprocessing.active_children())

    def _spawned() -> list[Any]:
        return [p for p in multiprocessing.active_children() if p not in before]

    def _expire() -> None:  # every wait bounded: a stuck measurement loses its nodes
        expired.set()
        _kill_jobs(holder.get("collector"), _spawned())

    # setup (spawning N nodes, pickling the policy) + rounds + 2 batches, generously
    watchdog = threading.Timer(timeout + 30.0 * workers + 10.0 * (warmup + rounds + 2),
                               _expire)
    watchdog.daemon = True
    watchdog.start()
    start = time.monotonic()
    collector = None
    samples: list[float] = []
    shutdown_s: float | None = None
    shutdown_ok: bool | None = None
    try:
        collector = DistributedCollector(
            [make_env] * workers, policy=actor,
            policy_factory=functools.partial(make_actor, params, kind),
            frames_per_batch=8 * workers, total_frames=10**12, collector_class=Collector,
            launcher="mp", tcp_port=_free_port(), sync=True, backend="gloo",
            weight_sync_schemes={"policy": scheme})
        holder["collector"] = collector
        setup_s = time.monotonic() - start
        leaf = next(actor.parameters())
        # a small random step per round (untimed): the weights change every round and, as
        # the check reads logits, never saturate the first tanh (a steady += 1.0 does, and
        # then a stale node's logits equal the learner's bit for bit)
        steps = torch.Generator().manual_seed(0)

        def _step() -> None:
            with torch.no_grad():
                leaf.add_(0.01 * torch.randn(leaf.shape, generator=steps))

        for r in range(warmup + rounds):
            _step()
            t0 = time.perf_counter()
            collector.update_policy_weights_()
            dt = time.perf_counter() - t0
            if r >= warmup:
                samples.append(dt)
        batches = iter(collector)
        acted, matched, close = _acted_with(next(batches), actor, threads)
        _step()  # not sent: a node that acts with it reads the learner's tensors
        aliased, _, _ = _acted_with(next(batches), actor, threads)
    except Exception:
        if expired.is_set():
            raise TimeoutError("measurement exceeded its bound; nodes killed") from None
        raise
    finally:
        watchdog.cancel()
        if collector is not None:
            t0 = time.monotonic()
            stopper = threading.Thread(target=collector.shutdown, daemon=True)
            stopper.start()
            stopper.join(shutdown_timeout)
            shutdown_ok = not stopper.is_alive()
            shutdown_s = time.monotonic() - t0
        _kill_jobs(collector, _spawned())
        scheme.shutdown()
        if torch.distributed.is_initialized():  # a shutdown cut short leaves the group
            torch.distributed.destroy_process_group()
        torch.set_num_threads(threads)
    ordered = sorted(samples)
    return {
        "median_s": statistics.median(samples),
        "p90_s": ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))],
        "min_s": ordered[0], "mean_s": statistics.fmean(samples), "samples_s": samples,
        "correct": None,
        "correct_reason": "DistributedCollector.state_dict() raises NotImplementedError "
                          "(torchrl 0.14.1): node weights cannot be read back; see "
                          "acted_with_learner (last batch's logits bit for bit)",
        "acted_with_learner": acted, "acted_with_learner_threads": matched,
        "acted_close_batched": close, "aliased": bool(aliased),
        "setup_s": setup_s, "shutdown_s": shutdown_s, "shutdown_in_bound": shutdown_ok,
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
    dist = args.collector == "distributed"
    things = DIST_THINGS if dist else THINGS
    baseline = things[-1]
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
                        if dist:
                            cfg["results"][thing] = measure_distributed(
                                thing, size, kind, n, rounds, warmup, args.timeout,
                                args.shutdown_timeout)
                        else:
                            cfg["results"][thing] = measure(
                                thing, size, kind, n, rounds, warmup, args.timeout,
                                unified=args.collector == "unified")
                    except Exception as exc:
                        cfg["errors"][thing] = "".join(
                            traceback.format_exception_only(type(exc), exc)).strip()
                        print(traceback.format_exc(), file=sys.stderr, flush=True)
                res = cfg["results"]
                base = res.get(baseline)
                cfg["speedup_vs_torchrl"] = {
                    t: base["median_s"] / r["median_s"] for t, r in res.items()
                    if base is not None and t != baseline}
                configs.append(cfg)
                print(_line(cfg, things), flush=True)
    # DistributedCollector's nodes cannot be read back (correct is None): its check is
    # that the last batch acted with the learner's weights
    flags = [r["acted_with_learner"] if r["correct"] is None else r["correct"]
             for c in configs for r in c["results"].values()]
    report: dict[str, Any] = {
        "benchmark": "torchrl scheme: update_policy_weights_() in "
                     + {"distributed": "DistributedCollector",
                        "unified": "Collector(num_collectors=N, sync=True)"}.get(
                            args.collector, "MultiSyncCollector"),
        "command": "python -m benchmarks.torchrl_scheme " + " ".join(args.argv),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "method": __doc__.split("\n\n")[4 if dist else 1].replace("\n", " "),
        "configs": configs, "total_wall_s": time.monotonic() - t_start,
        "all_correct": all(flags),
        "errors": sum(len(c["errors"]) for c in configs),
    }
    if dist:
        report["collector"] = "distributed"
        report["correct_note"] = ("correct is null: DistributedCollector.state_dict() raises "
                                  "NotImplementedError; all_correct uses acted_with_learner "
                                  "(the last batch's logits bit for bit)")
    return report


def _ms(res: dict[str, Any], thing: str) -> str:
    r = res.get(thing)
    return "-" if r is None else f"{r['median_s'] * 1e3:.2f}"


def _line(cfg: dict[str, Any], things: tuple[str, ...] = THINGS) -> str:
    res = cfg["results"]
    parts = " | ".join(f"{t} {_ms(res, t)} ms" for t in things)
    aliased = [t for t, r in res.items() if r["aliased"]]
    if things == DIST_THINGS:
        shut = " ".join(f"{t}={r['shutdown_s']:.1f}s" for t, r in res.items())
        return (f"{cfg['kind']:>4} {cfg['params']:>11,} params N={cfg['num_workers']}: "
                f"{parts}  acted_with_learner="
                f"{all(r['acted_with_learner'] for r in res.values())} aliased={aliased} "
                f"shutdown: {shut}")
    return (f"{cfg['kind']:>4} {cfg['params']:>11,} params N={cfg['num_workers']}: {parts}  "
            f"correct={all(r['correct'] for r in res.values())} aliased={aliased}")


def table(report: dict[str, Any]) -> str:
    """The README table: median ms of update_policy_weights_(), and torchrl / ours."""
    lines = ["| policy | params | N | weight-sync default | weight-sync gloo | weight-sync shm "
             "| torchrl SharedMem | torchrl / default ours "
             "| workers aliased to the learner (ours / torchrl) | correct |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for cfg in report["configs"]:
        res = cfg["results"]
        ours = [res[t]["median_s"] for t in THINGS[:1] if t in res]
        base = res.get("torchrl/shared_mem")
        ratio = f"{base['median_s'] / min(ours):.1f}x" if base and ours else "-"
        name = f"{cfg['kind']} ({cfg['leaves']} leaves)"
        ours_aliased = any(res[t]["aliased"] for t in THINGS[:-1] if t in res)
        theirs = "-" if base is None else ("yes" if base["aliased"] else "no")
        lines.append(f"| {name} | {cfg['params'] / 1e6:.1f}M | {cfg['num_workers']} | "
                     + " | ".join(_ms(res, t) for t in THINGS)
                     + f" | {ratio} | {'yes' if ours_aliased else 'no'} / {theirs} "
                     f"| {all(r['correct'] for r in res.values())} |")
    return "\n".join(lines)


def table_distributed(report: dict[str, Any]) -> str:
    """The README table for ``--collector distributed``: median ms of
    update_policy_weights_(), torchrl / ours, the batch check and shutdown times."""
    lines = ["| policy | params | N | weight-sync default | weight-sync gloo | weight-sync shm "
             "| torchrl Distributed | torchrl / default ours "
             "| last batch acted with learner (bit for bit) "
             "| shutdown s (default / gloo / shm / torchrl) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for cfg in report["configs"]:
        res = cfg["results"]
        ours = [res[t]["median_s"] for t in DIST_THINGS[:1] if t in res]
        base = res.get(DIST_THINGS[-1])
        ratio = f"{base['median_s'] / min(ours):.1f}x" if base and ours else "-"
        name = f"{cfg['kind']} ({cfg['leaves']} leaves)"
        shut = " / ".join("-" if t not in res or res[t]["shutdown_s"] is None
                          else f"{res[t]['shutdown_s']:.1f}" for t in DIST_THINGS)
        acted = all(r["acted_with_learner"] for r in res.values()) if res else "-"
        lines.append(f"| {name} | {cfg['params'] / 1e6:.1f}M | {cfg['num_workers']} | "
                     + " | ".join(_ms(res, t) for t in DIST_THINGS)
                     + f" | {ratio} | {acted} | {shut} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.torchrl_scheme",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="100K params, N=2, 5 rounds")
    parser.add_argument("--sizes", type=lambda s: int(float(s)), nargs="+", default=None)
    parser.add_argument("--kinds", nargs="+", choices=policies.KINDS, default=list(policies.KINDS))
    parser.add_argument("--workers", type=int, nargs="+", default=None)
    parser.add_argument("--collector", choices=("multisync", "unified", "distributed"),
                        default="multisync",
                        help="MultiSyncCollector, torchrl's unified Collector(num_collectors"
                             "=N, sync=True), or DistributedCollector (launcher='mp')")
    parser.add_argument("--things", nargs="+", choices=sorted(set(THINGS + DIST_THINGS)),
                        default=None,
                        help=f"default: {' '.join(THINGS)}; with --collector distributed: "
                             f"{' '.join(DIST_THINGS)}")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="bound on every wait of our scheme, seconds")
    parser.add_argument("--shutdown-timeout", type=float, default=60.0,
                        help="bound on DistributedCollector.shutdown(), seconds")
    parser.add_argument("--json-out", type=Path, default=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    args.sizes = args.sizes or ([100_000] if args.quick else list(SIZES))
    args.workers = args.workers or ([2] if args.quick else list(WORKERS))
    dist = args.collector == "distributed"
    allowed = DIST_THINGS if dist else THINGS
    args.things = args.things or list(allowed)
    wrong = [t for t in args.things if t not in allowed]
    if wrong:
        build_parser().error(f"--things {' '.join(wrong)} not measured with "
                             f"--collector {args.collector}")
    report = run(args)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    name = {"distributed": "torchrl_scheme_distributed",
            "unified": "torchrl_scheme_unified"}.get(args.collector, "torchrl_scheme")
    out = args.json_out or (QUICK_DIR if args.quick else BENCH_DIR / "results") / \
        f"{name}-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(table_distributed(report) if dist else table(report))
    print(f"wrote {out} (total {report['total_wall_s']:.0f}s, "
          f"all_correct={report['all_correct']}, errors={report['errors']})", flush=True)
    return 0 if report["all_correct"] and not report["errors"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
