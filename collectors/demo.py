"""``weight-sync demo``: a PPO learner and N collector processes learn CartPole.

Each iteration the learner takes one batch per collector from a
:class:`~weight_sync.collectors.group.CollectorGroup`, runs a PPO update on them (``[N, T]``), and
pushes the new actor weights to every collector with weight-sync
(``send_weights_async`` + ``wait_ack``). Collectors poll for weights before every env
step, so a batch can span two versions; every step carries the version that chose it.

A live progress bar shows the iteration, the average return (last ``--return-window``
finished episodes), the sync latency (p50/p99 over all syncs so far), the staleness of
the iteration's batches (learner version minus the oldest version in the batch) and the
frames per second; a summary table follows, and ``--json-out`` writes every iteration.

    weight-sync demo --collectors 2 --iterations 200 --seed 0 --json-out demo.json

With ``--collector torchrl`` the collectors are torchrl's own: a ``MultiSyncCollector``
whose weights travel through :class:`~weight_sync.torchrl.WeightSyncTorchRLScheme`
(:class:`~weight_sync.collectors.torchrl_group.TorchRLGroup`); workers are updated between batches
(``collector.update_policy_weights_()``), so the staleness is 0. Same bar, summary, JSON.

With ``--learners N`` the learner is N data-parallel CPU ranks started with torchrun, each
serving ``--collectors / N`` of the collectors and averaging gradients with the others
(:mod:`weight_sync.collectors.demo_ranks`); rank 0 prints the same summary.

With ``--launcher ray`` the collectors are Ray actors
(:class:`~weight_sync.collectors.ray_launcher.RayLauncher`, the ``ray`` extra) on a local Ray the
demo
starts and stops, or on the cluster of ``--ray-address`` (``auto``, or the ``host:port``
that ``ray start --head`` printed); their batches come back through Ray's object store.
On several nodes, ``--learner-host`` must be an address of this host that the other
nodes reach. Same bar, summary, JSON.

With ``--launcher network`` the collectors are processes started elsewhere
(``python -m weight_sync.collectors.remote``, by you, a cluster tool, or the demo itself with
``--start-collectors``) that connect to ``--listen`` and send their batches back over
that connection (:mod:`weight_sync.collectors.demo_network`); the summary names the hosts they
connected from. Same bar, summary, JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import math
import os
import statistics
import sys
import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from weight_sync.collectors.demo_network import NetworkCollectors, parse_listen
from weight_sync.collectors.group import BatchRecord, CollectorGroup
from weight_sync.collectors.launcher import Launcher
from weight_sync.collectors.task import (
    ENV_NAME,
    PPOLearner,
    TaskConfig,
    collect,
    episode_returns,
    make_env,
    make_policy,
    make_value,
)

from weight_sync import SenderConfig, SyncStats, WeightSyncError

if TYPE_CHECKING:
    from weight_sync.collectors.demo_ranks import DemoRank

__all__ = ["build_parser", "main"]

log = logging.getLogger(__name__)


class _Group(Protocol):
    """What the demo uses of a group: :class:`CollectorGroup` or ``TorchRLGroup``."""

    batch_records: Any  # deque[BatchRecord]

    @property
    def version(self) -> int: ...

    @property
    def stats(self) -> SyncStats: ...

    def next_batch(self) -> Any: ...

    def update_weights(self, timeout: float = ...) -> Any: ...

    def summary(self) -> dict[str, float]: ...

    def __enter__(self) -> Any: ...

    def __exit__(self, *exc: object) -> None: ...


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="weight-sync demo",
        description=f"PPO on {ENV_NAME}: one learner, N collector processes kept current "
                    "by weight-sync.")
    parser.add_argument("--collectors", type=int, default=2, help="collector processes (2)")
    parser.add_argument("--iterations", type=int, default=200,
                        help="PPO updates, each on one batch per collector (200)")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights and envs (0)")
    parser.add_argument("--frames-per-batch", type=int, default=TaskConfig.frames_per_batch,
                        help=f"env steps per collector batch ({TaskConfig.frames_per_batch})")
    parser.add_argument("--return-window", type=int, default=20,
                        help="finished episodes averaged into 'return' (20)")
    parser.add_argument("--sync-timeout", type=float, default=30.0,
                        help="seconds to wait for every collector's ack (30)")
    parser.add_argument("--collector", choices=["weight-sync", "torchrl"],
                        default="weight-sync",
                        help="weight-sync: this project's collector processes (default); "
                             "torchrl: torchrl's MultiSyncCollector with weight-sync's "
                             "WeightSyncTorchRLScheme")
    parser.add_argument("--learners", type=int, default=1,
                        help="data-parallel learner ranks on this host, started with "
                             "torchrun; each serves --collectors / --learners collectors (1)")
    parser.add_argument("--launcher", choices=["local", "ray", "network"], default="local",
                        help="local: collector processes on this host (default); ray: "
                             "collectors as Ray actors (needs the 'ray' extra); network: "
                             "collectors started elsewhere connect to --listen")
    parser.add_argument("--ray-address", default=None,
                        help="with --launcher ray: the Ray cluster to join ('auto' or "
                             "host:port); default: start a local Ray for the run")
    parser.add_argument("--learner-host", default="127.0.0.1",
                        help="address the collectors reach the learner's weight stream at "
                             "(127.0.0.1; on a multi-node Ray cluster or with collectors on "
                             "other hosts, this host's address)")
    parser.add_argument("--listen", default="127.0.0.1:0",
                        help="with --launcher network: HOST:PORT the collectors connect to "
                             "(127.0.0.1:0, a free port; the demo prints it)")
    parser.add_argument("--start-collectors", action="store_true",
                        help="with --launcher network: start the collectors "
                             "(python -m weight_sync.collectors.remote) on this host")
    parser.add_argument("--connect-timeout", type=float, default=60.0,
                        help="seconds to wait for every collector to be up (60)")
    parser.add_argument("--json-out", type=Path, default=None,
                        help="write per-iteration metrics to this JSON file")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def _ms(seconds: float) -> float:
    return seconds * 1e3 if not math.isnan(seconds) else float("nan")


def _iterate(args: argparse.Namespace, group: _Group, learner: PPOLearner,
             progress: Progress, rank: DemoRank | None = None) -> list[dict[str, Any]]:
    task = progress.add_task("demo", total=args.iterations, ret=float("nan"), p50=0.0,
                             p99=0.0, stale=0.0, fps=0.0)
    window: deque[float] = deque(maxlen=args.return_window)
    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    frames = 0
    world = rank.world if rank is not None else 1  # every rank: as many collectors
    share = args.collectors // world
    for iteration in range(1, args.iterations + 1):
        batches = [group.next_batch() for _ in range(share)]
        records: list[BatchRecord] = list(group.batch_records)[-share:]
        data = torch.stack(batches)  # [collectors, frames_per_batch], time last
        finished = episode_returns(data)
        if rank is not None:
            finished = rank.gather_returns(finished)
        window.extend(finished)
        losses = learner.update(data)
        group.update_weights(timeout=args.sync_timeout)
        frames += data.numel() * world
        elapsed = time.perf_counter() - start
        last = group.stats.last
        row: dict[str, Any] = {
            "iteration": iteration,
            "avg_return": statistics.fmean(window) if window else None,
            "episodes": len(finished),
            "iteration_return": statistics.fmean(finished) if finished else None,
            "sync_latency_s": last.round_s if last else None,
            "sync_p50_s": group.stats.latency(0.5),
            "sync_p99_s": group.stats.latency(0.99),
            "staleness_mean": statistics.fmean(r.staleness for r in records),
            "staleness_max": max(r.staleness for r in records),
            "batch_version_min": min(r.version_min for r in records),
            "batch_version_max": max(r.version_max for r in records),
            "frames": data.numel() * world,
            "total_frames": frames,
            "fps": frames / elapsed,
            "version": group.version,
            "elapsed_s": elapsed,
            "loss_objective": losses.get("loss_objective"),
            "entropy": losses.get("entropy"),
        }
        rows.append(row)
        progress.update(task, advance=1, ret=row["avg_return"] or float("nan"),
                        p50=_ms(row["sync_p50_s"]), p99=_ms(row["sync_p99_s"]),
                        stale=row["staleness_mean"], fps=row["fps"])
    return rows


def _summary(rows: list[dict[str, Any]], group: _Group, wall_s: float,
             args: argparse.Namespace) -> dict[str, Any]:
    returns = [r["avg_return"] for r in rows if r["avg_return"] is not None]
    stats = group.summary()
    return {
        "collector": args.collector,
        "launcher": args.launcher,
        "collectors": args.collectors,
        "iterations": len(rows),
        "seed": args.seed,
        "first_avg_return": returns[0] if returns else None,
        "last_avg_return": returns[-1] if returns else None,
        "best_avg_return": max(returns) if returns else None,
        "sync_rounds": int(stats["rounds"]),
        "sync_p50_ms": _ms(stats["p50_s"]),
        "sync_p99_ms": _ms(stats["p99_s"]),
        "sync_gbps_median": stats["gbps_median"],
        "weights_bytes": int(stats["nbytes"]),
        "staleness_mean": stats["staleness_mean"],
        "staleness_max": stats["staleness_max"],
        "total_frames": rows[-1]["total_frames"] if rows else 0,
        "fps": rows[-1]["fps"] if rows else None,
        "final_version": group.version,
        "wall_s": wall_s,
        # where the collectors were placed (transport="auto": per collector)
        "placements": {key[:-len("_collectors")]: {
            "collectors": int(stats[key]),
            "p50_ms": _ms(stats[key.replace("_collectors", "_p50_s")]),
            "gbps_median": stats[key.replace("_collectors", "_gbps_median")],
        } for key in stats if key.endswith("_collectors")},
    }


def _table(summary: dict[str, Any]) -> Table:
    kind = " (torchrl MultiSyncCollector)" if summary["collector"] == "torchrl" else ""
    if summary.get("learners", 1) > 1:
        kind += f", {summary['learners']} data-parallel learner ranks"
    kind += " as Ray actors" if summary["launcher"] == "ray" else ""
    kind += " over the network" if summary["launcher"] == "network" else ""
    table = Table(title=f"weight-sync demo: PPO on {ENV_NAME}, {summary['collectors']} "
                        f"collector(s){kind}, seed {summary['seed']}")
    table.add_column("metric")
    table.add_column("value", justify="right")

    def fmt(value: Any, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    table.add_row("average return, first -> last iteration",
                  f"{fmt(summary['first_avg_return'], '.1f')} -> "
                  f"{fmt(summary['last_avg_return'], '.1f')}")
    table.add_row("best average return", fmt(summary["best_avg_return"], ".1f"))
    table.add_row("iterations / weight versions",
                  f"{summary['iterations']} / {summary['final_version']}")
    table.add_row("sync latency p50 / p99 (ms)",
                  f"{summary['sync_p50_ms']:.2f} / {summary['sync_p99_ms']:.2f}")
    table.add_row("weights per sync (bytes), median GB/s",
                  f"{summary['weights_bytes']}, {summary['sync_gbps_median']:.4f}")
    for transport, placed in sorted(summary.get("placements", {}).items()):
        table.add_row(f"placed on {transport}: collectors, p50 (ms), median GB/s",
                      f"{placed['collectors']}, {placed['p50_ms']:.2f}, "
                      f"{placed['gbps_median']:.4f}")
    table.add_row("staleness mean / max (versions)",
                  f"{summary['staleness_mean']:.2f} / {fmt(summary['staleness_max'], '.0f')}")
    table.add_row("frames, frames/s",
                  f"{summary['total_frames']}, {fmt(summary['fps'], '.0f')}")
    table.add_row("wall time (s)", f"{summary['wall_s']:.1f}")
    if summary.get("collector_hosts"):
        table.add_row("collector hosts", ", ".join(summary["collector_hosts"]))
    if "ranks_in_sync" in summary:
        table.add_row("learner ranks' weights bit-equal at the end",
                      "yes" if summary["ranks_in_sync"] else "NO")
    return table


def _make_group(args: argparse.Namespace, policy: Any,
                network: NetworkCollectors | None) -> _Group:
    if args.collector == "torchrl":
        from weight_sync.collectors.torchrl_group import TorchRLGroup

        return TorchRLGroup(policy, make_env, num_collectors=args.collectors,
                            frames_per_batch=args.frames_per_batch, seed=args.seed,
                            sync_timeout=args.sync_timeout)
    return CollectorGroup(policy, make_env, make_policy, num_collectors=args.collectors,
                          frames_per_batch=args.frames_per_batch, seed=args.seed,
                          collect_fn=collect, launcher=_launcher(args, network),
                          sender_config=SenderConfig(host=args.learner_host),
                          connect_timeout=args.connect_timeout)


def _launcher(args: argparse.Namespace, network: NetworkCollectors | None) -> Launcher | None:
    if network is not None:
        return network.launcher
    if args.launcher == "local":
        return None
    from weight_sync.collectors.ray_launcher import RayLauncher

    local = {"num_cpus": max(args.collectors, os.cpu_count() or 1), "include_dashboard": False}
    # "local": a Ray of our own even when `ray start` left one running on this machine
    return RayLauncher(address=args.ray_address or "local",
                       init_kwargs=None if args.ray_address else local)


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns the process exit code (0 ok, 1 error, 130 interrupted)."""
    args = build_parser().parse_args(argv)
    if args.collectors < 1 or args.iterations < 1 or args.learners < 1:
        build_parser().error("--collectors, --iterations and --learners must be >= 1")
    if args.launcher == "ray" and args.collector == "torchrl":
        build_parser().error("--launcher ray starts weight-sync collectors, "
                             "not --collector torchrl")
    if args.launcher == "ray" and args.learners > 1:
        build_parser().error("--launcher ray runs one learner; --learners > 1 starts local "
                             "collector processes per rank")
    if args.launcher == "network" and (args.collector == "torchrl" or args.learners > 1):
        build_parser().error("--launcher network serves weight-sync collectors and one "
                             "learner (not --collector torchrl, not --learners > 1)")
    if args.start_collectors and args.launcher != "network":
        build_parser().error("--start-collectors goes with --launcher network")
    if args.launcher == "network":
        try:
            parse_listen(args.listen)
        except ValueError as exc:
            build_parser().error(str(exc))
    if args.launcher == "ray" and importlib.util.find_spec("ray") is None:
        build_parser().error("--launcher ray needs the 'ray' extra: "
                             "pip install 'weight-sync[ray]'")
    rank: DemoRank | None = None
    if args.learners > 1:
        from weight_sync.collectors import demo_ranks

        if args.collector != "weight-sync" or args.collectors % args.learners:
            build_parser().error("--learners > 1 needs --collector weight-sync and "
                                 "--collectors divisible by --learners")
        if not demo_ranks.in_rank():
            return demo_ranks.launch(sys.argv[1:] if argv is None else argv, args.learners)
        rank = demo_ranks.DemoRank(args)
        args.quiet = args.quiet or not rank.is_writer()
    console = Console(stderr=True)
    torch.set_num_threads(1)  # the collectors need the other cores
    torch.manual_seed(args.seed)
    config = TaskConfig(frames_per_batch=args.frames_per_batch)
    policy = make_policy(config.hidden)
    if rank is not None:
        learner = rank.learner(policy, make_value(config.hidden), config, args.seed)
    else:
        learner = PPOLearner.from_config(policy, make_value(config.hidden), config)
    columns = [TextColumn("[bold]iter"), MofNCompleteColumn(), BarColumn(bar_width=12),
               TextColumn("return [cyan]{task.fields[ret]:5.1f}"),
               TextColumn("sync p50/p99 {task.fields[p50]:.1f}/{task.fields[p99]:.1f} ms"),
               TextColumn("stale {task.fields[stale]:.1f}"),
               TextColumn("{task.fields[fps]:4.0f} fps"), TimeElapsedColumn()]
    start = time.perf_counter()
    network: NetworkCollectors | None = None
    try:
        if args.launcher == "network":
            try:
                network = NetworkCollectors(args, console.print)
            except OSError as exc:
                console.print(f"[red]demo failed:[/red] cannot listen at {args.listen}: {exc}")
                return 1
        with network or contextlib.nullcontext(), \
                (rank.group(args, policy) if rank else _make_group(args, policy, network)) \
                as group, Progress(*columns, console=console, disable=args.quiet) as progress:
            rows = _iterate(args, group, learner, progress, rank)
            summary = _summary(rows, group, time.perf_counter() - start, args)
            if rank is not None:
                summary |= {"learners": rank.world, "ranks_in_sync": rank.in_sync(policy)}
            if network is not None:
                summary["collector_hosts"] = [network.hosts.get(i, "?")
                                              for i in range(args.collectors)]
        if network is not None:  # reaped by now
            summary["collector_exit_codes"] = network.exit_codes()
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: collectors stopped[/yellow]")
        return 130
    except WeightSyncError as exc:
        console.print(f"[red]demo failed:[/red] {exc}")
        return 1
    finally:
        if rank is not None:
            rank.close()
    if rank is not None and not rank.is_writer():
        return 0
    out = Console()
    out.print(_table(summary))
    if args.json_out is not None:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(
            {"summary": summary, "iterations": rows, "config": vars(args) | {
                "json_out": str(args.json_out), "task": config.__dict__}}, indent=2))
        out.print(f"per-iteration metrics written to {args.json_out}")
    return 0
