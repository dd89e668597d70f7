"""Soak test: many sync rounds while collectors are SIGKILLed and restarted.

The learner (this process) fills its weights deterministically from the version
number, so every collector recomputes the expected weights from the version alone and
compares them exactly on every apply, the first one after a (re)join included.

Each round the learner writes a new version, calls ``send_weights_async()`` and
``wait_ack()``, then spends the rest of ``--step-ms`` (its stand-in for a training
step) handling the collectors' reports. With probability ``--kill-prob`` per round one
connected collector is SIGKILLed (never the last ``--min-live``): before the send,
between the send and the wait (its ack pending), or from a timer thread while the
learner is inside ``wait_ack()`` (or just after it, when the wait was shorter). A new
process with the same id is started 0..``--restart-delay`` rounds later; the learner
admits it inside ``send_weights_async()``/``wait_ack()`` and catches it up with the
newest version, without restarting the learner or the other collectors. A
``CollectorFailed`` naming the killed incarnation is expected; one naming anything
else is not. A restart (spawn + import torch) takes seconds, i.e. many rounds, so
kills stop once the rounds left would take less than 1.5x the slowest restart seen so
far (before the first one, the startup): restarts then rejoin inside the loop. After
the loop, collectors still down are started and every collector is waited for until it
acked the newest version. Every wait is bounded; every process is reaped at the end.

    python -m benchmarks.soak --rounds 1000 --collectors 4 --json-out soak.json

Figures (printed and written as JSON): rounds, kills (and how), rejoins,
rejoins_in_loop (its "joined" report arrived before the round loop ended),
mismatches, hangs (a ``wait_ack`` or ``send_weights_async`` that raised
``WeightSyncTimeout``, returned with a live collector still lagging, or ran past the
ack timeout), expected_failures, unexpected_failures (a failure of a collector that
was not killed, a collector-side error, a process that exited badly, an exception in
the learner), final_acked, left_alive (processes still running 30 s after
``close()``), the learner's RSS at start and end (and every 100 rounds), the slowest
``wait_ack``/``send_weights_async``, wall time, and one event per kill (collector,
round killed, how, round its failure was reported, round restarted, round rejoined,
first version applied and whether it matched). Exit status 1 unless mismatches, hangs,
unexpected_failures, left_alive and unreaped are 0 and final_acked equals the number
of collectors. Not part of the default test run.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import random
import signal
import statistics
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as wait_readable
from typing import Any

import torch

from weight_sync import (
    AckResult,
    CollectorFailed,
    WeightReceiver,
    WeightSender,
    WeightSyncError,
    WeightSyncTimeout,
)
from weight_sync.errors import ClosedError, PeerGone

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


def collector_main(info: Any, cid: int, out: Connection, timeout: float) -> None:
    """One collector process: connect, then check every applied version exactly.

    Reports go through ``out``, a pipe only this process writes: a small message is
    one write, so a SIGKILL never leaves a torn message or a held lock behind.
    """
    torch.set_num_threads(1)
    pid = os.getpid()
    weights = make_weights(-1)
    rx = WeightReceiver(weights, info, cid, timeout=timeout, idle_slice=0.5)
    applies = bad = 0

    def check(version: int) -> bool:
        nonlocal applies, bad
        applies += 1
        ok = matches(weights, version)
        if not ok:
            bad += 1
            out.send(("mismatch", cid, version, pid))
        if applies % 25 == 0:
            out.send(("applies", cid, applies, pid))
        return ok

    try:
        first = rx.connect(timeout=120)
        out.send(("joined", cid, (first, check(first)), pid))
        while True:
            version = rx.receive_weights(timeout=0.05)
            if version is not None:
                check(version)
    except (ClosedError, PeerGone):
        pass  # the learner closed (or is gone): the normal end
    except Exception as exc:
        out.send(("error", cid, f"{type(exc).__name__}: {exc}", pid))
    finally:
        rx.close()
        with contextlib.suppress(OSError):  # the learner stopped reading
            out.send(("exit", cid, (applies, bad), pid))


@dataclass
class Proc:
    """One collector process (one incarnation of a collector id)."""

    cid: int
    proc: Any
    reader: Connection | None
    started: float
    event: dict[str, Any] | None = None  # the kill this process is the restart for
    joined: bool = False
    killed: bool = False
    applies: int = 0  # checked applies it reported (every 25, and at exit)
    exit_report: tuple[int, int] | None = None


@dataclass
class Expected:
    """A SIGKILLed collector whose failure the learner has not reported yet."""

    pid: int
    incarnation: int | None
    event: dict[str, Any]


@dataclass
class Soak:
    args: argparse.Namespace
    sender: WeightSender
    weights: dict[str, torch.Tensor]  # the learner's policy, rewritten every round
    rng: random.Random
    stats: dict[str, Any]
    procs: list[Proc] = field(default_factory=list)
    current: dict[int, Proc] = field(default_factory=dict)
    expected: dict[int, Expected] = field(default_factory=dict)
    restart_at: dict[int, tuple[int, dict[str, Any]]] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    round: int = 0
    in_loop: bool = False
    startup_s: float = 0.0  # spawn to joined, the first collectors (all at once)
    slowest_restart_s: float = 0.0  # spawn to joined, a restarted collector
    kills_stopped: bool = False
    waits: list[float] = field(default_factory=list)  # seconds per wait_ack in the loop
    timers: list[threading.Timer] = field(default_factory=list)

    # -- processes -----------------------------------------------------------------
    def start(self, cid: int, event: dict[str, Any] | None = None) -> None:
        reader, writer = CTX.Pipe(duplex=False)
        proc = CTX.Process(target=collector_main,
                           args=(self.sender.connection_info, cid, writer, self.args.ack_timeout),
                           daemon=True, name=f"soak-collector-{cid}")
        proc.start()
        writer.close()  # the child holds the only write end: its death reads as EOF
        p = Proc(cid, proc, reader, time.monotonic(), event)
        self.procs.append(p)
        self.current[cid] = p
        if event is not None:
            event["restarted_round"] = self.round if self.in_loop else None
            event["restarted_pid"] = proc.pid

    def pump(self, until: float) -> None:
        """Handle collector reports until ``until`` (monotonic); at least one poll."""
        while True:
            open_procs = [p for p in self.procs if p.reader is not None]
            if not open_procs:
                return
            ready = wait_readable([p.reader for p in open_procs if p.reader is not None],
                                  max(until - time.monotonic(), 0.0))
            if not ready:
                return
            for p in open_procs:
                reader = p.reader
                if reader is None or reader not in ready:
                    continue
                try:
                    kind, cid, value, _pid = reader.recv()
                except (EOFError, OSError):  # the process is gone
                    reader.close()
                    p.reader = None
                    continue
                self.handle(p, kind, cid, value)

    def handle(self, p: Proc, kind: str, cid: int, value: Any) -> None:
        stats = self.stats
        if kind == "joined":
            first, ok = value
            p.joined = True
            took = time.monotonic() - p.started
            if p.event is None:
                self.startup_s = max(self.startup_s, took)
            else:
                self.slowest_restart_s = max(self.slowest_restart_s, took)
                stats["rejoins"] += 1
                stats["rejoins_in_loop"] += self.in_loop
                p.event.update(rejoined_round=self.round if self.in_loop else None,
                               rejoined_in_loop=self.in_loop, first_version=first,
                               first_version_ok=ok, restart_to_join_s=round(took, 2))
        elif kind == "mismatch":
            stats["mismatches"] += 1
            stats["errors"].append(f"collector {cid} (pid {p.proc.pid}): version {value} "
                                   "differs from the learner's")
        elif kind == "error":
            stats["unexpected_failures"] += 1
            stats["errors"].append(f"collector {cid} (pid {p.proc.pid}): {value}")
        elif kind == "applies":
            p.applies = max(p.applies, value)
        elif kind == "exit":
            p.exit_report = value
            p.applies = max(p.applies, value[0])

    # -- kills ---------------------------------------------------------------------
    def killable(self) -> list[Proc]:
        live = [p for p in self.current.values()
                if p.joined and not p.killed and p.proc.is_alive()]
        return live if len(live) > self.args.min_live else []

    def mark_killed(self, victim: Proc, how: str) -> dict[str, Any]:
        """Record a kill about to happen: the failure the learner may report for it."""
        self.resolve_superseded()
        link = self.sender.links.get(victim.cid)
        inc = link.incarnation if link is not None and link.peer_pid == victim.proc.pid \
            else None
        event: dict[str, Any] = {
            "collector": victim.cid, "killed_round": self.round, "how": how,
            "killed_pid": victim.proc.pid, "killed_incarnation": inc,
            "failure_reported_round": None, "failure_superseded": False,
            "restarted_round": None, "rejoined_round": None, "rejoined_in_loop": False,
        }
        self.events.append(event)
        victim.killed = True
        self.expected[victim.cid] = Expected(victim.proc.pid, inc, event)
        self.stats["kills"] += 1
        self.stats["kills_by_how"][how] = self.stats["kills_by_how"].get(how, 0) + 1
        return event

    def reap(self, victim: Proc, event: dict[str, Any]) -> None:
        """Make sure the victim is dead and reaped, then schedule its restart."""
        with contextlib.suppress(ProcessLookupError):  # no-op if the timer already did
            os.kill(victim.proc.pid, signal.SIGKILL)
        victim.proc.join(10)
        if victim.proc.is_alive():
            self.stats["unexpected_failures"] += 1
            self.stats["errors"].append(f"pid {victim.proc.pid} survived SIGKILL for 10 s")
        delay = self.rng.randint(0, self.args.restart_delay)
        self.restart_at[victim.cid] = (self.round + delay, event)

    def resolve_superseded(self) -> None:
        """A restart admitted before the old link's failure was seen replaces that
        link silently: no failure will be reported for the killed incarnation."""
        for cid, exp in list(self.expected.items()):
            link = self.sender.links.get(cid)
            if link is not None and link.peer_pid != exp.pid:
                exp.event["failure_superseded"] = True
                del self.expected[cid]

    def failed(self, result: AckResult, where: str) -> None:
        """Sort the failures of a ``CollectorFailed`` into expected and unexpected."""
        for cid, reason in result.failed.items():
            exp = self.expected.get(cid)
            if exp is not None and (exp.incarnation is None
                                    or f"(incarnation {exp.incarnation})" in reason):
                exp.event["failure_reported_round"] = self.round if self.in_loop else None
                del self.expected[cid]
                self.stats["expected_failures"] += 1
            else:
                self.stats["unexpected_failures"] += 1
                self.stats["errors"].append(f"{where}: collector {cid} failed: {reason}")

    # -- learner calls -------------------------------------------------------------
    def send(self) -> bool:
        """Publish the next version (weights derived from it); False if it raised."""
        sender, stats = self.sender, self.stats
        version = sender.version + 1
        with torch.no_grad():
            for k, v in make_weights(version).items():
                self.weights[k].copy_(v)
        start = time.monotonic()
        try:
            got: int | None = sender.send_weights_async()
        except WeightSyncError as exc:
            self.learner_error(f"round {self.round}: send_weights_async", exc)
            got = None
        took = time.monotonic() - start
        if took > stats["slowest_send_s"]:
            stats["slowest_send_s"], stats["slowest_send_round"] = round(took, 3), self.round
        if got is None:
            return False
        if took > self.args.ack_timeout + 5:  # admitting a join blocked it
            stats["hangs"] += 1
            stats["errors"].append(f"round {self.round}: send_weights_async took {took:.1f}s")
        if got != version:
            stats["unexpected_failures"] += 1
            stats["errors"].append(f"round {self.round}: sent version {got}, expected {version}")
        return True

    def wait(self, timeout: float) -> tuple[AckResult | None, float]:
        """``wait_ack``; failures sorted, timeouts counted as hangs."""
        start = time.monotonic()
        result: AckResult | None = None
        try:
            result = self.sender.wait_ack(timeout=timeout)
        except CollectorFailed as exc:
            result = exc.result if isinstance(exc.result, AckResult) else None
            if result is None:
                self.learner_error(f"round {self.round}: wait_ack", exc)
            else:
                self.failed(result, f"round {self.round}")
                if result.lagging:  # it also ran out of time on a live collector
                    self.stats["hangs"] += 1
                    self.stats["errors"].append(f"round {self.round}: {exc}")
        except WeightSyncError as exc:
            self.learner_error(f"round {self.round}: wait_ack", exc)
            return None, time.monotonic() - start
        waited = time.monotonic() - start
        if waited > timeout + 5:
            self.stats["hangs"] += 1
            self.stats["errors"].append(f"round {self.round}: wait_ack took {waited:.1f}s")
        return result, waited

    def sync_round(self, victim: Proc | None, how: str) -> None:
        """Send a version and wait for its acks, SIGKILLing ``victim`` at point ``how``:
        before the send, after it (the message in flight, its ack pending), or from a
        timer thread while ``wait_ack`` runs (after it if the wait is shorter)."""
        event: dict[str, Any] = {}
        if victim is not None and how == "before_send":
            event = self.mark_killed(victim, how)
            os.kill(victim.proc.pid, signal.SIGKILL)
        if self.send():
            timer: threading.Timer | None = None
            in_wait = threading.Event()
            if victim is not None and how == "after_send":
                event = self.mark_killed(victim, how)
                os.kill(victim.proc.pid, signal.SIGKILL)
            elif victim is not None and how == "in_wait_ack":
                event = self.mark_killed(victim, how)
                typical = statistics.median(self.waits[-50:]) if self.waits else 0.005

                def fire(ev: dict[str, Any] = event, pid: int = victim.proc.pid) -> None:
                    ev["landed_in_wait_ack"] = in_wait.is_set()
                    os.kill(pid, signal.SIGKILL)

                timer = threading.Timer(self.rng.uniform(0, typical / 2), fire)
                self.timers.append(timer)
                in_wait.set()
                timer.start()
            _, waited = self.wait(self.args.ack_timeout)
            in_wait.clear()
            if timer is not None:
                timer.join(10)
            self.waits.append(waited)
            if waited > self.stats["slowest_wait_ack_s"]:
                self.stats["slowest_wait_ack_s"] = round(waited, 3)
                self.stats["slowest_wait_ack_round"] = self.round
        if victim is not None:
            if not victim.killed:  # the send failed before the kill point
                event = self.mark_killed(victim, how)
            self.reap(victim, event)

    def learner_error(self, where: str, exc: WeightSyncError) -> None:
        key = "hangs" if isinstance(exc, WeightSyncTimeout) else "unexpected_failures"
        self.stats[key] += 1
        self.stats["errors"].append(f"{where}: {type(exc).__name__}: {exc}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=(__doc__ or "soak").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1000)
    parser.add_argument("--collectors", type=int, default=4)
    parser.add_argument("--kill-prob", type=float, default=0.015,
                        help="chance per round that a random connected collector is SIGKILLed")
    parser.add_argument("--restart-delay", type=int, default=3,
                        help="a killed collector is restarted 0..this many rounds later")
    parser.add_argument("--min-live", type=int, default=1,
                        help="never kill when it would leave fewer connected collectors")
    parser.add_argument("--step-ms", type=float, default=40.0,
                        help="each round lasts at least this long (the learner's training "
                             "step), spent handling collector reports")
    parser.add_argument("--ack-timeout", type=float, default=30.0)
    parser.add_argument("--final-timeout", type=float, default=180.0,
                        help="after the loop, how long to wait for every collector's ack")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--transport", choices=["distributed", "shm"], default="distributed",
                        help="the learner's transport (shm: same-host shared memory)")
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    n = args.collectors
    step_s = args.step_ms / 1000
    weights = make_weights(0)
    sender = WeightSender(weights, n, timeout=args.ack_timeout, transport=args.transport)
    stats: dict[str, Any] = {
        "collectors": n, "transport": args.transport, "rounds": 0, "kills": 0,
        "kills_by_how": {}, "rejoins": 0,
        "rejoins_in_loop": 0, "mismatches": 0, "hangs": 0, "expected_failures": 0,
        "unexpected_failures": 0, "final_acked": 0, "left_alive": 0,
        "slowest_send_s": 0.0, "slowest_send_round": None, "slowest_wait_ack_s": 0.0,
        "slowest_wait_ack_round": None, "errors": [],
    }
    soak = Soak(args, sender, weights, random.Random(args.seed), stats)
    t0 = time.monotonic()
    try:
        for cid in range(n):
            soak.start(cid)
        sender.connect(timeout=180)
        stats["startup_s"] = round(time.monotonic() - t0, 2)
        deadline = time.monotonic() + 60
        while not all(p.joined for p in soak.current.values()) \
                and time.monotonic() < deadline:
            soak.pump(min(time.monotonic() + 0.5, deadline))
        stats["rss_start_kib"] = rss_kib()
        stats["rss_kib_every_100_rounds"] = []
        soak.in_loop = True
        loop_start = time.monotonic()
        for r in range(1, args.rounds + 1):
            soak.round = r
            round_start = time.monotonic()
            soak.resolve_superseded()
            # Kill only while a restart would still rejoin inside the loop: the rounds
            # left must outlast 1.5x the slowest restart (before any, the startup).
            per_round = max(step_s, (round_start - loop_start) / max(r - 1, 1))
            restart_s = soak.slowest_restart_s or soak.startup_s
            if not soak.kills_stopped and \
                    (args.rounds - r - args.restart_delay) * per_round < 1.5 * restart_s:
                soak.kills_stopped = True
                stats["kills_stopped_at_round"] = r
            victim: Proc | None = None
            how = ""
            candidates = [] if soak.kills_stopped else soak.killable()
            if candidates and soak.rng.random() < args.kill_prob:
                victim = soak.rng.choice(candidates)
                how = soak.rng.choice(["before_send", "after_send", "in_wait_ack"])
            soak.sync_round(victim, how)
            for cid, (due, ev) in list(soak.restart_at.items()):
                if due <= r:
                    del soak.restart_at[cid]
                    soak.start(cid, ev)
            stats["rounds"] = r
            soak.pump(round_start + step_s)
            if r % 100 == 0:
                stats["rss_kib_every_100_rounds"].append(rss_kib())
                print(f"round {r}: kills {stats['kills']} rejoins {stats['rejoins']} "
                      f"mismatches {stats['mismatches']} hangs {stats['hangs']} "
                      f"unexpected {stats['unexpected_failures']} rss {rss_kib()} KiB "
                      f"{time.monotonic() - t0:.0f}s", flush=True)
        soak.pump(time.monotonic())
        soak.in_loop = False
        loop_end = time.monotonic()
        stats["loop_s"] = round(loop_end - loop_start, 1)
        stats["rss_end_kib"] = rss_kib()
        # Catch-up: restart the collectors still down and wait until all acked the newest.
        for cid, (_due, ev) in list(soak.restart_at.items()):
            soak.start(cid, ev)
        soak.restart_at.clear()
        deadline = time.monotonic() + args.final_timeout
        while time.monotonic() < deadline:
            soak.resolve_superseded()
            result, _ = soak.wait(min(args.ack_timeout, max(deadline - time.monotonic(), 0.001)))
            soak.pump(time.monotonic())
            if result is not None:
                stats["final_acked"] = len(result.acked)
                if len(result.acked) == n and all(p.joined for p in soak.current.values()):
                    break
            lost = [p.cid for p in soak.current.values() if not p.joined and not p.proc.is_alive()]
            if lost:  # a restart died before joining: waiting longer cannot help
                stats["errors"].append(f"catch-up: collector(s) {lost} exited before joining")
                break
            soak.pump(time.monotonic() + 0.1)  # restarts are still spawning
        else:
            stats["errors"].append(f"catch-up: {stats['final_acked']} of {n} collectors "
                                   f"acked after {args.final_timeout:.0f}s")
        stats["final_version"] = sender.version
        stats["catch_up_s"] = round(time.monotonic() - loop_end, 1)
        stats["pool_allocated"] = sender.buffers_allocated
    except Exception:  # report it with everything gathered so far
        stats["unexpected_failures"] += 1
        stats["errors"].append(traceback.format_exc())
    finally:
        for timer in soak.timers:
            timer.cancel()
            timer.join(10)
        try:
            sender.close()
        except Exception:  # still reap every process below
            stats["unexpected_failures"] += 1
            stats["errors"].append(traceback.format_exc())
        end = time.monotonic() + 30
        for p in soak.procs:
            while p.proc.is_alive() and time.monotonic() < end:
                soak.pump(time.monotonic())  # drain reports while they exit
                p.proc.join(min(0.2, max(end - time.monotonic(), 0.0)))
        stats["left_alive"] = sum(p.proc.is_alive() for p in soak.procs)
        for p in soak.procs:
            if p.proc.is_alive():
                p.proc.kill()
            p.proc.join(10)
        soak.pump(time.monotonic())
        stats["unreaped"] = sum(p.proc.is_alive() for p in soak.procs)
        for p in soak.procs:
            if p.reader is not None:
                p.reader.close()
                p.reader = None
            if not p.killed and p.proc.exitcode != 0:
                stats["unexpected_failures"] += 1
                stats["errors"].append(f"collector {p.cid} (pid {p.proc.pid}) exited with "
                                       f"{p.proc.exitcode}")
    stats["checked_applies"] = sum(p.applies for p in soak.procs)
    stats["slowest_restart_to_join_s"] = round(soak.slowest_restart_s, 2)
    stats["kills_landed_in_wait_ack"] = sum(bool(e.get("landed_in_wait_ack"))
                                            for e in soak.events)
    stats["events"] = soak.events
    stats["median_wait_ack_s"] = round(statistics.median(soak.waits), 4) if soak.waits else None
    stats["wall_s"] = round(time.monotonic() - t0, 1)
    stats["errors_total"] = len(stats["errors"])
    del stats["errors"][20:]  # the first ones tell the story
    stats["ok"] = (stats["mismatches"] == 0 and stats["hangs"] == 0
                   and stats["unexpected_failures"] == 0 and stats["left_alive"] == 0
                   and stats["unreaped"] == 0 and stats["final_acked"] == n)
    print(json.dumps(stats, indent=2))
    if args.json_out:
        with open(args.json_out, "w") as out:
            json.dump(stats, out, indent=2)
    return stats


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
