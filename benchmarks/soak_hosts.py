"""Soak across simulated hosts: rounds while collectors are killed, links flap and the
learner itself is killed and restarted from its checkpoint.

On the project's test bed (:mod:`testbed`), a learner on host 0 pushes a policy of
``--params`` parameters to ``--per-host`` collectors on each of hosts 1..``--hosts``
(``transport="distributed"``, links shaped to ``--rate``), one round every
``--step-ms``. Faults, drawn from ``--seed``:

* every ~``--kill-every`` rounds a collector process is SIGKILLed and started again
  1..``--restart-rounds`` rounds later (it rejoins and is caught up);
* every ~``--flap-every`` rounds a collector host's link goes down for ``--flap-s``
  seconds (``ip link set eth0 down``), and, with ``--throttle-every``, its rate drops
  to ``--throttle-rate`` for ``--throttle-s`` (a congestion spike; tc's netem, for loss
  and delay, is missing from this kernel);
* ``--learner-restarts`` times the learner is SIGKILLed mid-round and a new one started
  at the same address, resuming from the last version it reported (its checkpoint).
  With ``--reattach-timeout`` > 0 the collectors re-attach to it without a restart;
  with 0 they end (``PeerGone``) and are started again.

The weights of each version are a function of the version alone, so every collector
checks every apply exactly (the library's own checksum is on as well). Printed and
written as JSON: rounds, kills (of which killed while still joining: a process is
killable once started), rejoins, link flaps, throttles, learner restarts,
re-attaches, collector restarts forced by a learner restart, mismatches (must be 0),
hangs (must be 0: a round's wait past ``--ack-timeout`` + 2 s, a collector's poll past
``--poll-bound-s``, a silence of ``--hang-s`` from the learner, a process not gone at
the end), unexpected exits, the learner's RSS (first round -> last, per incarnation).
Exit status 1 unless mismatches, hangs and unexpected exits are 0 and every collector
ended at the final version. Needs root and iproute2; not in the default test run.

    python -m benchmarks.soak_hosts --rounds 1000 --json-out benchmarks/results/soak-hosts.json
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import testbed  # noqa: E402
from benchmarks.soak_hosts_nodes import load_checkpoint  # noqa: E402
from testbed import TestBed  # noqa: E402

PORT = 29631


class Soak:
    """The run: its processes on the bed, one queue of their JSON lines, the tallies."""

    def __init__(self, bed: TestBed, a: argparse.Namespace) -> None:
        self.bed, self.a = bed, a
        self.rng = random.Random(a.seed)
        self.events: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.n = a.hosts * a.per_host
        self.collectors: dict[int, subprocess.Popen[bytes]] = {}
        self.killed: set[int] = set()  # ids whose current process we killed
        self.restart_at: dict[int, int] = {}  # id -> round to start it again
        self.learner: subprocess.Popen[bytes] | None = None
        self.learner_up = False
        self.rounds = self.version = 0
        self.joining: set[int] = set()  # started, not joined yet
        self.stderr: dict[int, str] = {}  # pid -> its stderr file
        self._seq = itertools.count()
        self.tally = dict(kills=0, killed_while_joining=0, rejoins=0, flaps=0, throttles=0,
                          learner_restarts=0, reattached=0, forced_restarts=0, mismatches=0,
                          hangs=0,
                          unexpected_exits=0, round_failures=0)
        self.hang_notes: list[str] = []
        self.notes: list[str] = []
        self.rss: list[dict[str, int]] = []  # per learner incarnation: first, last
        self.exits: dict[int, dict[str, Any]] = {}
        self.waits: list[float] = []
        restarts = sorted(self.rng.sample(range(a.rounds // 5, a.rounds * 4 // 5),
                                          a.learner_restarts)) if a.learner_restarts else []
        self.learner_restart_rounds = set(restarts)
        assert bed.tmpdir is not None
        self.checkpoint = os.path.join(bed.tmpdir, "learner-checkpoint")

    # -- processes ---------------------------------------------------------------------
    def _start(self, host: int, tag: str, role: str, args: dict[str, Any],
               stdin: bool = False) -> subprocess.Popen[bytes]:
        assert self.bed.tmpdir is not None
        err = os.path.join(self.bed.tmpdir, f"{tag}-{next(self._seq)}.err")
        with open(err, "wb") as stderr:
            proc = self.bed.hosts[host].popen(
                [sys.executable, "-m", "benchmarks.soak_hosts_nodes", role, json.dumps(args)],
                stdout=subprocess.PIPE, stderr=stderr,
                stdin=subprocess.PIPE if stdin else subprocess.DEVNULL, cwd=str(ROOT))
        self.stderr[proc.pid] = err
        threading.Thread(target=self._read, args=(tag, proc), daemon=True).start()
        return proc

    def _read(self, tag: str, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:  # ends at EOF: the process is gone
            try:
                self.events.put((tag, (proc, json.loads(line))))
            except json.JSONDecodeError:
                continue
        self.events.put((tag, (proc, None)))

    def start_learner(self) -> None:
        a = self.a
        self.learner = self._start(0, "learner", "learner", {
            "address": self.bed.hosts[0].address, "port": PORT, "n": self.n,
            "numel": a.params, "start_version": load_checkpoint(self.checkpoint),
            "checkpoint": self.checkpoint, "timeout": a.timeout,
            "liveness": a.liveness, "connect_timeout": a.connect_timeout,
            "ack_timeout": a.ack_timeout, "step_ms": a.step_ms,
            "final_timeout": a.connect_timeout}, stdin=True)
        self.rss.append({})

    def start_collector(self, cid: int) -> None:
        a = self.a
        self.killed.discard(cid)
        self.restart_at.pop(cid, None)
        self.joining.add(cid)
        self.collectors[cid] = self._start(1 + cid // a.per_host, f"c{cid}", "collector", {
            "address": self.bed.hosts[0].address, "port": PORT, "cid": cid,
            "numel": a.params, "timeout": a.timeout, "connect_timeout": a.connect_timeout,
            "reattach_timeout": a.reattach_timeout, "poll_s": 0.05,
            "poll_bound_s": a.poll_bound_s})

    def stderr_tail(self, proc: subprocess.Popen[bytes]) -> str:
        try:
            with open(self.stderr[proc.pid], "rb") as file:
                lines = file.read().decode(errors="replace").splitlines()
        except (KeyError, OSError):
            return "(no stderr)"
        kept = [ln for ln in lines if not ln.startswith(("[W", "frame #", "Exception raised"))]
        return " | ".join(kept[-6:])

    @staticmethod
    def _kill(proc: subprocess.Popen[bytes]) -> None:
        with contextlib.suppress(ProcessLookupError):  # its own session: all it started
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)

    # -- the loop ----------------------------------------------------------------------
    def run(self) -> None:
        a = self.a
        self.start_learner()
        for cid in range(self.n):
            self.start_collector(cid)
        while self.rounds < a.rounds:
            self.handle(self.next_event(a.hang_s))
        self.finish()

    def next_event(self, timeout: float) -> tuple[str, Any]:
        try:
            return self.events.get(timeout=timeout)
        except queue.Empty:
            self.tally["hangs"] += 1
            raise RuntimeError(f"no event from any process for {timeout:.0f}s at round "
                               f"{self.rounds} (version {self.version})") from None

    def handle(self, event: tuple[str, Any]) -> None:
        tag, (proc, msg) = event
        if tag == "learner":
            self.on_learner(proc, msg)
        else:
            self.on_collector(int(tag[1:]), proc, msg)

    def on_learner(self, proc: subprocess.Popen[bytes], msg: dict[str, Any] | None) -> None:
        if proc is not self.learner:
            return  # a killed incarnation's last lines
        if msg is None:
            self.tally["unexpected_exits"] += 1
            raise RuntimeError(f"the learner exited on its own (rc {proc.wait(10)}) at "
                               f"round {self.rounds}")
        if msg.get("connected"):
            self.learner_up = True
            self.rss[-1]["first"] = msg["rss_kib"]
        if not msg.get("round"):
            return
        self.rounds += 1
        self.version = msg["version"]
        self.rss[-1]["last"] = msg["rss_kib"]
        self.waits.append(msg["wait_s"])
        if msg["wait_s"] > self.a.ack_timeout + 2:
            self.tally["hangs"] += 1
            self.hang_notes.append(f"round {self.rounds}: wait {msg['wait_s']}s")
        if msg["failed"] or msg["lagging"]:
            self.tally["round_failures"] += 1
        self.faults()

    def on_collector(self, cid: int, proc: subprocess.Popen[bytes],
                     msg: dict[str, Any] | None) -> None:
        current = self.collectors.get(cid) is proc
        if msg is None:
            if current and cid not in self.killed and self.rounds < self.a.rounds:
                self.tally["unexpected_exits"] += 1
                self.notes.append(f"collector {cid} exited (rc {proc.wait(10)}) at round "
                                  f"{self.rounds}: {self.stderr_tail(proc)}")
                self.restart_at[cid] = self.rounds + 1
            return
        if "mismatch" in msg:
            self.tally["mismatches"] += 1
            self.notes.append(f"collector {cid}: version {msg['mismatch']} not bit-exact")
        elif "joined" in msg:
            self.joining.discard(cid)
            if self.version > 0:
                self.tally["rejoins"] += 1
        elif "reattached" in msg:
            self.tally["reattached"] += 1
        elif "slow_poll" in msg:
            self.tally["hangs"] += 1
            self.hang_notes.append(f"collector {cid}: a poll took {msg['slow_poll']}s")
        elif "exit" in msg and current:
            self.exits[cid] = msg
            if msg["exit"] != "closed" and self.rounds < self.a.rounds:
                if "PeerGone" in msg["exit"] and not self.a.reattach_timeout:
                    self.tally["forced_restarts"] += 1
                else:
                    self.tally["unexpected_exits"] += 1
                    self.notes.append(f"collector {cid} at round {self.rounds}: "
                                      f"{msg['exit']}")
                self.restart_at[cid] = self.rounds + 1

    def faults(self) -> None:
        a, r = self.a, self.rounds
        for cid, at in list(self.restart_at.items()):
            if r >= at:
                self.start_collector(cid)
        if r in self.learner_restart_rounds:
            self.restart_learner()
            return
        live = [c for c in range(self.n) if c not in self.killed and c not in self.restart_at]
        if a.kill_every and self.rng.random() < 1 / a.kill_every and len(live) > 1:
            cid = self.rng.choice(live)
            self.killed.add(cid)
            self._kill(self.collectors[cid])
            self.tally["kills"] += 1
            if cid in self.joining:  # its process had not joined yet: no rejoin to count
                self.tally["killed_while_joining"] += 1
            self.restart_at[cid] = r + self.rng.randint(1, a.restart_rounds)
        if a.flap_every and self.rng.random() < 1 / a.flap_every:
            self.bed.flap(1 + self.rng.randrange(a.hosts), a.flap_s)
            self.tally["flaps"] += 1
        if a.throttle_every and self.rng.random() < 1 / a.throttle_every:
            self.bed.throttle(1 + self.rng.randrange(a.hosts), a.throttle_rate, a.throttle_s)
            self.tally["throttles"] += 1

    def restart_learner(self) -> None:
        assert self.learner is not None
        self._kill(self.learner)
        self.learner_up = False
        self.tally["learner_restarts"] += 1
        for cid in list(self.restart_at):  # the new learner waits for every collector
            self.start_collector(cid)
        self.start_learner()

    def finish(self) -> None:
        a = self.a
        for cid in list(self.restart_at):
            self.start_collector(cid)
        assert self.learner is not None and self.learner.stdin is not None
        self.learner.stdin.write(b"stop\n")
        self.learner.stdin.flush()
        final: dict[str, Any] | None = None
        deadline = time.monotonic() + a.connect_timeout + 60
        while (final is None or len(self.exits) < self.n) and time.monotonic() < deadline:
            tag, (proc, msg) = self.next_event(max(deadline - time.monotonic(), 0.1))
            if tag == "learner" and proc is self.learner and msg and msg.get("final"):
                final = msg
                self.version = msg["version"]
            elif tag != "learner" and msg and "exit" in msg and self.collectors.get(
                    int(tag[1:])) is proc:
                self.exits[int(tag[1:])] = msg
            elif tag != "learner":
                self.handle((tag, (proc, msg)))
        self.final = final
        for proc in [self.learner, *self.collectors.values()]:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                self.tally["hangs"] += 1
                self.hang_notes.append(f"process {proc.pid} still running 30 s after close")

    def report(self) -> dict[str, Any]:
        waits = sorted(self.waits)
        at_final = sorted(c for c, e in self.exits.items()
                          if self.final and e.get("version") == self.final["version"])
        return {
            "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(self.a).items()},
            "rounds": self.rounds, **self.tally,
            "final_version": self.final["version"] if self.final else None,
            "final_error": self.final.get("error") if self.final else "no final report",
            "collectors_at_final_version": at_final,
            "applies": sum(e.get("applies", 0) for e in self.exits.values()),
            "worst_poll_s": max((e.get("worst_poll_s", 0) for e in self.exits.values()),
                                default=None),
            "wait_median_s": waits[len(waits) // 2] if waits else None,
            "wait_max_s": waits[-1] if waits else None,
            "learner_rss_kib": self.rss, "hang_notes": self.hang_notes[:20],
            "notes": self.notes[:40], "exits": {str(c): e for c, e in self.exits.items()},
        }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.soak_hosts",
                                description=__doc__.split("\n\n")[0])
    add = p.add_argument
    add("--rounds", type=int, default=1000)
    add("--hosts", type=int, default=4, help="collector hosts (the learner has its own)")
    add("--per-host", type=int, default=2)
    add("--params", type=int, default=100_000)
    add("--rate", default="1gbit")
    add("--step-ms", type=float, default=20.0, help="the learner's round pace")
    add("--kill-every", type=float, default=60.0, help="mean rounds between kills (0: none)")
    add("--restart-rounds", type=int, default=40)
    add("--flap-every", type=float, default=120.0)
    add("--flap-s", type=float, default=2.0)
    add("--throttle-every", type=float, default=120.0)
    add("--throttle-rate", default="20mbit")
    add("--throttle-s", type=float, default=2.0)
    add("--learner-restarts", type=int, default=2)
    add("--reattach-timeout", type=float, default=60.0,
        help="collectors wait this long for a new learner (0: they end and are restarted)")
    add("--liveness", type=float, default=5.0, help="the learner's liveness timeout")
    add("--ack-timeout", type=float, default=5.0)
    add("--timeout", type=float, default=30.0)
    add("--connect-timeout", type=float, default=120.0)
    add("--poll-bound-s", type=float, default=2.0,
        help="a collector's receive_weights(timeout=0.05) taking longer counts as a hang")
    add("--hang-s", type=float, default=90.0)
    add("--seed", type=int, default=0)
    add("--json-out", type=Path)
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = build_parser().parse_args(argv)
    reason = testbed.available()
    if reason is not None:
        raise SystemExit(f"the test bed cannot run here: {reason}")
    start = time.monotonic()
    with TestBed(hosts=1 + a.hosts, rate=a.rate) as bed:
        soak = Soak(bed, a)
        try:
            soak.run()
        except RuntimeError as exc:
            soak.notes.append(f"aborted: {exc}")
            soak.final = None
        result = soak.report()
    result["wall_s"] = round(time.monotonic() - start, 1)
    if a.json_out:
        a.json_out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("config", "exits")},
                     indent=1))
    ok = (result["mismatches"] == 0 and result["hangs"] == 0
          and result["unexpected_exits"] == 0
          and len(result["collectors_at_final_version"]) == soak.n)
    if not ok:
        raise SystemExit(1)
    return result


if __name__ == "__main__":
    main()
