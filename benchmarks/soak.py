"""Soak test: many sync rounds with collectors SIGKILLed and restarted at random.

The learner (this process) fills its weights deterministically from the version
number, so every collector recomputes the expected weights from the version alone and
compares them exactly on every apply. Killed collectors are restarted with the same
id and rejoin without restarting the learner or the others.

    python -m benchmarks.soak --rounds 1000 --collectors 4 --json-out soak.json

Figures: rounds, kills, rejoins, mismatches (must be 0), hangs (a ``wait_ack`` that
ran past its timeout or raised ``WeightSyncTimeout``: must be 0), unexpected failures
(a ``CollectorFailed`` naming a collector that was not killed: must be 0), and the
learner's RSS at start and end. Not part of the default test run.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import queue as queue_mod
import random
import signal
import sys
import time
from typing import Any

import torch

from weight_sync import (
    ClosedError,
    CollectorFailed,
    PeerGone,
    WeightReceiver,
    WeightSender,
    WeightSyncError,
    WeightSyncTimeout,
)

CTX = mp.get_context("spawn")


def make_weights(version: int) -> dict[str, torch.Tensor]:
    """The learner's weights at ``version`` (bit-identical in every process)."""
    gen = torch.Generator().manual_seed(version + 1_000_003)
    return {
        "w1": torch.randn(64, 32, generator=gen),
        "b1": torch.randn(64, generator=gen),
        "w2": torch.randn(16, 64, generator=gen).to(torch.bfloat16),
        "step": torch.tensor(version, dtype=torch.int64),
    }


def matches(weights: dict[str, torch.Tensor], version: int) -> bool:
    want = make_weights(version)
    return all(torch.equal(weights[k], want[k]) for k in want)


def rss_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return -1


def collector_main(info: Any, cid: int, out_q: Any, timeout: float) -> None:
    torch.set_num_threads(1)
    weights = make_weights(-1)
    rx = WeightReceiver(weights, info, cid, timeout=timeout, idle_slice=0.5)
    applies = bad = 0
    try:
        version: int | None = rx.connect(timeout=120)
        out_q.put(("joined", cid, version, os.getpid()))
        while True:
            if version is not None:
                applies += 1
                if not matches(weights, version):
                    bad += 1
                    out_q.put(("mismatch", cid, version, os.getpid()))
            version = rx.receive_weights(timeout=0.05)
    except (ClosedError, PeerGone):
        pass
    except WeightSyncError as exc:
        out_q.put(("error", cid, f"{type(exc).__name__}: {exc}", os.getpid()))
    finally:
        rx.close()
        out_q.put(("exit", cid, (applies, bad), os.getpid()))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1000)
    parser.add_argument("--collectors", type=int, default=4)
    parser.add_argument("--kill-prob", type=float, default=0.015,
                        help="chance per round that a random live collector is SIGKILLed")
    parser.add_argument("--ack-timeout", type=float, default=30.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rng = random.Random(args.seed)
    n = args.collectors
    # One result queue per process: a SIGKILLed writer can die holding a shared
    # queue's write lock and silently wedge every other writer's reports.
    queues: list[Any] = []
    procs: dict[int, Any] = {}
    every: list[Any] = []
    weights = make_weights(0)
    sender = WeightSender(weights, n, timeout=args.ack_timeout)
    info = sender.connection_info
    stats: dict[str, Any] = {"rounds": 0, "kills": 0, "rejoins": 0, "mismatches": 0,
                             "hangs": 0, "collector_failed": 0, "unexpected_failures": 0,
                             "errors": [], "rss_start_kib": rss_kib()}
    killed_pending: dict[int, int] = {}  # cid -> killed pid, not yet reported/replaced
    restart_at: dict[int, int] = {}  # cid -> round at which to restart it
    joined: dict[int, int] = {}
    joined_pids: set[int] = set()  # only collectors that finished connecting are killed

    def start(cid: int) -> None:
        out_q = CTX.Queue()
        queues.append(out_q)
        proc = CTX.Process(target=collector_main, args=(info, cid, out_q, args.ack_timeout),
                           daemon=True, name=f"soak-collector-{cid}")
        proc.start()
        procs[cid] = proc
        every.append(proc)

    def drain() -> None:
        for q in queues:
            while True:
                try:
                    kind, cid, value, _pid = q.get_nowait()
                except queue_mod.Empty:
                    break
                handle(kind, cid, value, _pid)

    def handle(kind: str, cid: int, value: Any, pid: int) -> None:
        if kind == "joined":
            joined_pids.add(pid)
            joined[cid] = joined.get(cid, 0) + 1
            if joined[cid] > 1:
                stats["rejoins"] += 1
        elif kind == "mismatch":
            stats["mismatches"] += 1
        elif kind == "error":
            stats["errors"].append(f"collector {cid}: {value}")

    t0 = time.monotonic()
    try:
        for cid in range(n):
            start(cid)
        sender.connect(timeout=180)
        stats["rss_start_kib"] = rss_kib()
        slowest = 0.0
        for r in range(1, args.rounds + 1):
            for cid in [c for c, at in restart_at.items() if at <= r]:
                del restart_at[cid]
                start(cid)
            live = [c for c, p in procs.items() if p.is_alive() and c not in restart_at
                    and p.pid in joined_pids]
            if len(live) > 1 and rng.random() < args.kill_prob:
                victim = rng.choice(live)
                os.kill(procs[victim].pid, signal.SIGKILL)
                procs[victim].join(10)
                stats["kills"] += 1
                killed_pending[victim] = procs[victim].pid
                restart_at[victim] = r + rng.randint(1, 20)
            with torch.no_grad():
                for k, v in make_weights(r).items():
                    weights[k].copy_(v)
            version = sender.send_weights_async()
            assert version == r
            start_wait = time.monotonic()
            try:
                sender.wait_ack(timeout=args.ack_timeout)
            except CollectorFailed as exc:
                failed = set(exc.result.failed)  # type: ignore[union-attr]
                stats["collector_failed"] += len(failed)
                unexpected = failed - set(killed_pending)
                stats["unexpected_failures"] += len(unexpected)
                if unexpected:
                    stats["errors"].append(f"round {r}: {exc}")
                for c in failed:
                    killed_pending.pop(c, None)
                if exc.result.lagging:  # type: ignore[union-attr]
                    stats["hangs"] += 1
            except WeightSyncTimeout as exc:
                stats["hangs"] += 1
                stats["errors"].append(f"round {r}: {exc}")
            waited = time.monotonic() - start_wait
            slowest = max(slowest, waited)
            if waited > args.ack_timeout + 5:
                stats["hangs"] += 1
            # a restarted collector replaces the killed link: no failure will be reported
            killed_pending = {c: pid for c, pid in killed_pending.items()
                              if c not in sender.transports
                              or sender.transports[c].peer_pid == pid}
            stats["rounds"] = r
            drain()
            if r % 100 == 0:
                print(f"round {r}: kills {stats['kills']} rejoins {stats['rejoins']} "
                      f"mismatches {stats['mismatches']} hangs {stats['hangs']} "
                      f"rss {rss_kib()} KiB pool {sender._pool.allocated}", flush=True)
        # let every restarted collector rejoin and catch up before the end
        for cid in list(restart_at):
            start(cid)
        restart_at.clear()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            drain()
            try:
                res = sender.wait_ack(timeout=1)
            except WeightSyncError:
                continue
            if len(res.acked) == n:
                break
            time.sleep(0.1)
        stats["final_acked"] = len(sender.transports)
        stats["slowest_wait_ack_s"] = round(slowest, 3)
        stats["pool_allocated"] = sender._pool.allocated
        stats["rss_end_kib"] = rss_kib()
    finally:
        sender.close()
        end = time.monotonic() + 30
        for proc in every:
            proc.join(max(end - time.monotonic(), 0.1))
        for proc in every:
            if proc.is_alive():
                proc.kill()
            proc.join(10)
        drain()
        stats["left_alive"] = sum(p.is_alive() for p in every)
        for q in queues:
            q.cancel_join_thread()
    stats["wall_s"] = round(time.monotonic() - t0, 1)
    stats["collectors"] = n
    print(json.dumps(stats, indent=2))
    if args.json_out:
        with open(args.json_out, "w") as out:
            json.dump(stats, out, indent=2)
    return stats


if __name__ == "__main__":
    result = main()
    ok = (result["mismatches"] == 0 and result["hangs"] == 0
          and result["unexpected_failures"] == 0 and result["left_alive"] == 0)
    sys.exit(0 if ok else 1)
