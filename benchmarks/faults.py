"""The fault matrix: every fault scenario against every transport on simulated hosts,
with the time until it was reported and the time until the faulty side ended or
recovered; written as JSON and as the table of ``docs/faults.md``.

On the project's test bed (:mod:`testbed`: 3 hosts, links shaped to ``--rate``), each
cell is a short scripted run: a learner on host 0 publishes a policy of ``--numel``
float32 (4 MB by default) every ``--step-ms`` to 3 collectors (placed per transport,
:data:`LAYOUTS`), and waits for their acks; a fault is injected at a chosen moment
(:data:`SCENARIOS`), and the runner records:

* ``went_on``: the run went on (the learner kept publishing and every collector that is
  meant to be live applied the newest versions), or ended as the scenario expects;
* ``detect_s``: time from the fault until the side that must notice it reported it (the
  learner's ``wait_ack`` raising ``CollectorFailed`` for a collector fault; the
  collectors for a learner fault; the refused joiner for a wrong secret);
* ``recover_s``: time from the fault (or its end: a restored link, a ``SIGCONT``) until
  the faulty side recovered (applied a new version) or ended;
* ``missed``: versions the healthy collectors did not apply (gaps), must be 0;
* ``wrong``: applies whose bytes differ from the learner's version (every collector
  checks every version by content), must be 0;
* ``leftovers``: processes still running after the run closed, ``/dev/shm`` segments
  on any host, store keys beyond those of the live collectors.

A cell is ✓ when all of that holds and every wait ended within its bound; ✗ names what
did not (a scenario that raises, hangs or crashes is recorded in its cell, the matrix
goes on); ``n/a`` says why a scenario does not apply to a transport; an unknown
transport (``auto`` before it exists) is a skipped column. Needs root and iproute2.

    python -m benchmarks.faults                 # the full matrix (13 min on 2 cores)
    python -m benchmarks.faults --quick         # 2 transports x 6 scenarios (2.5 min)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import itertools
import json
import os
import queue
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import testbed  # noqa: E402
from testbed import TestBed, TestBedError  # noqa: E402
from testbed._system import namespace_pids  # noqa: E402

PORT = 29641
TRANSPORTS = ("auto", "distributed", "shm", "relay")
QUICK_TRANSPORTS = ("distributed", "relay")
SECRET = "fault-matrix secret"
#: Collector id -> host index, per transport (host 0 is the learner's). ``shm`` needs
#: collectors on the learner's host; ``auto`` gets one there and one on each other host.
LAYOUTS: dict[str, dict[int, int]] = {
    "shm": {0: 0, 1: 0, 2: 2},
    "auto": {0: 0, 1: 1, 2: 2},
    "": {0: 1, 1: 1, 2: 2},
}
#: The collector a process fault hits, per transport (``relay``: host 1's head, whose
#: host mate and host 2 receive through it).
PROCESS_TARGET = {"shm": 0, "auto": 1, "": 0}
LINK_HOST = 2  # cut / flapped: host 2, collector 2 alone on it
SLOW_HOST = 1  # throttled: host 1, the first relay of the chain
SHM_FILL = "fault-matrix-fill"


class Hang(Exception):
    """A bounded wait of the script ran out."""


class CellFailed(Exception):
    """The scenario's own check failed (the message says what happened)."""


@dataclass(frozen=True)
class Options:
    numel: int = 1_000_000
    step_ms: float = 100.0
    rate: str = "1gbit"
    slow_rate: str = "100mbit"
    liveness: float = 2.0
    learner_timeout: float = 3.0
    ack_timeout: float = 5.0
    timeout: float = 20.0
    connect_timeout: float = 60.0
    margin_s: float = 15.0
    """Slack on a loaded 2-core machine for every bound: a hang guard, not a claim."""
    cell_s: float = 180.0
    """Bound on one cell, teardown excluded."""


# -- one run on a bed --------------------------------------------------------------------
class Run:
    """A learner and collectors on a bed, their JSON lines in one queue, every event
    kept (``self.log``: ``(tag, pid, message or None at exit)``)."""

    def __init__(self, bed: TestBed, transport: str, opts: Options, *, secret: str = "",
                 reattach: float = 0.0, rejoin: bool = True, extra: int = 0) -> None:
        self.bed, self.transport, self.opts = bed, transport, opts
        self.secret, self.reattach, self.rejoin = secret, reattach, rejoin
        key = transport if transport in LAYOUTS else ""
        self.layout = dict(LAYOUTS[key])
        self.target = PROCESS_TARGET[key]
        self.n = len(self.layout)
        self.max_collectors = self.n + extra
        self.events: queue.Queue[tuple[str, int, dict[str, Any] | None]] = queue.Queue()
        self.log: list[tuple[str, int, dict[str, Any] | None]] = []
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.all_procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.learner_pid = 0
        self.deadline = time.monotonic() + opts.cell_s
        assert bed.tmpdir is not None
        self.checkpoint = os.path.join(bed.tmpdir, "checkpoint")
        self.baseline_keys: int | None = None
        self.closing_at = 0  # events logged before the teardown began
        self.strict = True  # a learner's error ends the cell (CellFailed)
        self.garbage_keys = 0

    # -- processes -----------------------------------------------------------------------
    def _start(self, host: int, tag: str, role: str, args: dict[str, Any]) -> None:
        assert self.bed.tmpdir is not None
        err = os.path.join(self.bed.tmpdir, f"{tag}-{len(self.all_procs)}.err")
        with open(err, "wb") as stderr:
            proc = self.bed.hosts[host].popen(
                [sys.executable, "-m", "benchmarks.faults_nodes", role, json.dumps(args)],
                stdout=subprocess.PIPE, stderr=stderr, stdin=subprocess.PIPE, cwd=str(ROOT))
        proc.err_path = err  # type: ignore[attr-defined]
        self.procs[tag] = proc
        self.all_procs.append((tag, proc))
        threading.Thread(target=self._read, args=(tag, proc), daemon=True).start()

    def _read(self, tag: str, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:  # ends at EOF: the process is gone
            with contextlib.suppress(json.JSONDecodeError):
                self.events.put((tag, proc.pid, json.loads(line)))
        self.events.put((tag, proc.pid, None))

    def start_learner(self) -> None:
        self._start(0, "L", "learner", {
            "address": self.bed.hosts[0].address, "port": PORT, "n": self.n,
            "max_collectors": self.max_collectors, "numel": self.opts.numel,
            "transport": self.transport, "secret": self.secret,
            "checkpoint": self.checkpoint, "timeout": self.opts.timeout,
            "liveness": self.opts.liveness, "connect_timeout": self.opts.connect_timeout,
            "ack_timeout": self.opts.ack_timeout, "step_ms": self.opts.step_ms})

    def start_collector(self, cid: int, host: int | None = None, **over: Any) -> None:
        args = {"address": self.bed.hosts[0].address, "port": PORT, "cid": cid,
                "numel": self.opts.numel, "timeout": self.opts.timeout,
                "connect_timeout": self.opts.connect_timeout,
                "learner_timeout": self.opts.learner_timeout,
                "reattach_timeout": self.reattach, "secret": self.secret,
                "rejoin": self.rejoin, "poll_s": 0.05, **over}
        self._start(self.layout[cid] if host is None else host, f"c{cid}", "collector", args)

    def start_garbage(self, host: int, spare: int, count: int) -> None:
        self._start(host, "G", "garbage", {"address": self.bed.hosts[0].address,
                                           "port": PORT, "spare": spare, "count": count})

    def tell(self, tag: str, line: str) -> None:
        proc = self.procs[tag]
        if proc.stdin is not None and proc.poll() is None:
            with contextlib.suppress(OSError):
                proc.stdin.write(line.encode() + b"\n")
                proc.stdin.flush()

    def signal(self, tag: str, sig: int) -> float:
        """Send ``sig`` to ``tag``'s process (and its group); returns the time."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.procs[tag].pid, sig)
        return time.time()

    def when_exited(self, tag: str, pid: int) -> str:
        """Whether ``tag``'s process ``pid`` ended during the run or at its teardown."""
        for i, (t, p, m) in enumerate(self.log):
            if t == tag and p == pid and m is None:
                return "during the run" if i < self.closing_at else "at teardown"
        return "after the teardown"

    def stderr_tail(self, tag: str, proc: subprocess.Popen[bytes] | None = None) -> str:
        path = getattr(proc or self.procs.get(tag), "err_path", None)
        try:
            with open(str(path), "rb") as file:
                lines = file.read().decode(errors="replace").splitlines()
        except OSError:
            return ""
        kept = [ln for ln in lines if ln.strip() and not ln.startswith(
            ("[W", "frame #", "Exception raised", "  "))]
        return " | ".join(kept[-8:])[-1200:]

    # -- events --------------------------------------------------------------------------
    def wait(self, cond: Callable[[], Any], timeout: float, what: str) -> Any:
        """Pump events until ``cond()`` is truthy (returned); past ``timeout`` (or the
        cell's bound), :class:`Hang`."""
        end = min(time.monotonic() + timeout, self.deadline)
        while True:
            got = cond()
            if got:
                return got
            left = end - time.monotonic()
            if left <= 0:
                raise Hang(f"{what}: not within {timeout:.0f}s")
            try:  # in slices: a condition may also turn on a process's exit status
                item = self.events.get(timeout=min(left, 0.1))
            except queue.Empty:
                continue
            self.log.append(item)
            self._check(item)

    def idle(self, seconds: float) -> None:
        """Go on taking events for ``seconds`` (the fault script's own schedule)."""
        end = time.monotonic() + seconds
        with contextlib.suppress(Hang):
            self.wait(lambda: time.monotonic() >= end, seconds + 1, "idle")

    def _check(self, item: tuple[str, int, dict[str, Any] | None]) -> None:
        tag, _, msg = item
        if tag == "L" and msg is not None and msg["ev"] == "error" and self.strict:
            raise CellFailed(f"the learner failed at {msg['where']}: {msg['kind']}: "
                             f"{msg['why']}")

    def find(self, tag: str | None = None, ev: str | None = None, since: float = 0.0,
             pid: int | None = None) -> list[dict[str, Any]]:
        return [m for t, p, m in self.log if m is not None and (tag is None or t == tag)
                and (ev is None or m["ev"] == ev) and m["t"] >= since
                and (pid is None or p == pid)]

    def exited(self, tag: str, pid: int | None = None) -> bool:
        pid = self.procs[tag].pid if pid is None else pid
        return any(t == tag and p == pid and m is None for t, p, m in self.log)

    @property
    def version(self) -> int:
        rounds = self.find("L", "round")
        return rounds[-1]["v"] if rounds else -1

    def applied(self, cid: int, since: float = 0.0) -> list[dict[str, Any]]:
        return [m for m in self.find(f"c{cid}", since=since) if m["ev"] in ("joined", "applied")]

    def current(self, cids: list[int], version: int, since: float = 0.0) -> bool:
        return all(any(m["v"] >= version for m in self.applied(c, since)) for c in cids)

    # -- the script's steps --------------------------------------------------------------
    def start(self) -> None:
        self.start_learner()
        for cid in self.layout:
            self.start_collector(cid)
        self.wait(lambda: self.find("L", "up"), 60, "the learner to start")
        self.learner_pid = self.find("L", "up")[-1]["pid"]
        self.settle(5, connect=True)

    def settle(self, rounds: int = 5, cids: list[int] | None = None,
               connect: bool = False) -> None:
        """Wait until the learner published ``rounds`` more versions and ``cids`` (default:
        every collector) applied the last of them."""
        if connect:
            self.wait(lambda: self.find("L", "connected"), self.opts.connect_timeout
                      + self.opts.margin_s, "the learner to connect its collectors")
        target = self.version + rounds
        cids = sorted(self.layout) if cids is None else cids
        self.wait(lambda: self.version >= target and self.current(cids, target),
                  rounds * self.opts.step_ms / 1000 + self.opts.ack_timeout
                  + self.opts.margin_s, f"version {target} applied by collectors {cids}")
        if self.baseline_keys is None:
            self.baseline_keys = self.find("L", "round")[-1]["keys"]

    def next_round(self) -> float:
        """Wait for the learner's next round report (every ack in: collectors idle)."""
        seen = len(self.find("L", "round"))
        self.wait(lambda: len(self.find("L", "round")) > seen, self.opts.ack_timeout
                  + self.opts.margin_s, "the learner's next round")
        return time.time()

    def reported(self, cid: int, since: float, what: str = "") -> tuple[float, str]:
        """Seconds from ``since`` until the learner's ``wait_ack`` named ``cid`` as
        failed (or lagging, at its timeout), and how."""
        def seen() -> dict[str, Any] | None:
            for m in self.find("L", "round", since):
                if str(cid) in m["failed"] or cid in m["lagging"]:
                    return m
            return None

        msg = self.wait(seen, self.opts.liveness + self.opts.ack_timeout
                        + self.opts.margin_s, f"the learner to report collector {cid}{what}")
        how = "CollectorFailed" if str(cid) in msg["failed"] else "WeightSyncTimeout"
        return msg["t"] - since, how

    def recovered(self, cid: int, since: float, bound: float = 60.0,
                  version: int | None = None) -> float:
        """Seconds from ``since`` until ``cid`` applied a version (at least ``version``)."""
        want = self.version if version is None else version

        def seen() -> dict[str, Any] | None:
            got = [m for m in self.applied(cid, since) if m["v"] >= want]
            return got[0] if got else None

        return float(self.wait(seen, bound, f"collector {cid} to apply version {want} "
                               f"again")["t"]) - since

    # -- teardown and the tallies ----------------------------------------------------------
    def finish(self) -> list[str]:
        """Close everything (collectors told to quit, the learner to stop), wait for every
        process within a bound, and list what was left behind."""
        left: list[str] = []
        self.closing_at = len(self.log)
        for tag in self.procs:
            if tag.startswith("c"):
                self.tell(tag, "quit")
        self.tell("L", "stop")
        # a frozen process would never exit: resume everything first
        for tag in self.procs:
            self.signal(tag, signal.SIGCONT)
        # a collector still inside a join attempt reads quit once that attempt ends
        bound = max(self.opts.timeout, self.opts.connect_timeout) + self.opts.margin_s
        end = time.monotonic() + bound
        self.deadline = end
        with contextlib.suppress(Hang, CellFailed):
            self.wait(lambda: all(p.poll() is not None and self.exited(t, p.pid)
                                  for t, p in self.all_procs), end - time.monotonic(),
                      "every process to exit")
        for tag, proc in self.all_procs:
            if proc.poll() is None:
                left.append(f"process {tag} (pid {proc.pid}) still running "
                            f"{bound:.0f}s after close")
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        for host in self.bed.hosts:
            holder = host._holder.pid if host._holder is not None else -1
            stray = [p for p in namespace_pids(host.netns) if p != holder]
            if stray:
                left.append(f"{host.name}: processes {stray} still in its namespace")
            shm = host.run(["ls", "-A", "/dev/shm"], timeout=10).stdout.split()
            shm = [s for s in shm if s != SHM_FILL]
            if shm:
                left.append(f"{host.name}: /dev/shm holds {shm[:5]}")
        return left

    def final_keys(self) -> int | None:
        final = self.find("L", "final")
        return final[-1]["keys"] if final else None

    def wrong(self) -> list[str]:
        return [f"c{c}: version {m['v']}" for c in self._cids()
                for m in self.applied(c) if not m["ok"]]

    def missed(self, cids: list[int]) -> dict[int, int]:
        """Versions each of ``cids`` skipped between two applies of one join."""
        out: dict[int, int] = {}
        for c in cids:
            joins: list[list[int]] = []
            for t, _, m in self.log:
                if t != f"c{c}" or m is None or m["ev"] not in ("joined", "applied"):
                    continue
                if m["ev"] == "joined" or not joins:
                    joins.append([])
                joins[-1].append(m["v"])
            out[c] = 0
            for seq in joins:
                vs = sorted(set(seq))
                out[c] += sum(b - a - 1 for a, b in itertools.pairwise(vs))
        return out

    def _cids(self) -> list[int]:
        return sorted({int(t[1:]) for t, _ in self.all_procs if t.startswith("c")})

    def ends(self, cid: int, since: float = 0.0) -> list[dict[str, Any]]:
        return self.find(f"c{cid}", "end", since)


# -- the scenarios -----------------------------------------------------------------------
@dataclass(frozen=True)
class Outcome:
    """What a scenario measured (the runner adds wrong bytes, gaps and leftovers)."""

    detect_s: float | None = None
    recover_s: float | None = None
    note: str = ""
    affected: tuple[int, ...] = ()
    """Collectors the fault hits (the others must miss no version); ``None`` for all."""
    all_affected: bool = False
    went_on: bool = True


def _kill_and_replace(run: Run, cid: int, t0: float, note: str) -> Outcome:
    tag = f"c{cid}"
    old = run.procs[tag].pid
    run.wait(lambda: run.exited(tag, old), 10, f"collector {cid}'s process to die")
    detect, how = run.reported(cid, t0)
    since = time.time()
    run.start_collector(cid)
    recover = run.recovered(cid, t0, version=run.version)
    run.settle()
    return Outcome(detect, recover, f"{note}; reported by {how}; a new process with id "
                   f"{cid} current {recover - (since - t0):.1f}s after its start",
                   affected=(cid,))


def kill_idle(run: Run) -> Outcome:
    cid = run.target
    run.next_round()
    t0 = run.signal(f"c{cid}", signal.SIGKILL)
    return _kill_and_replace(run, cid, t0, "SIGKILL between two versions")


def kill_mid(run: Run) -> Outcome:
    cid = run.target
    run.tell(f"c{cid}", "die")
    mid = run.wait(lambda: run.find(f"c{cid}", "mid"), 10 + run.opts.margin_s,
                   f"collector {cid} to be caught mid-transfer")[-1]
    return _kill_and_replace(run, cid, mid["t"], f"SIGKILL with version {mid['v']} "
                             f"{mid['how']}")


def restart_same_id(run: Run) -> Outcome:
    cid = run.target
    run.next_round()
    t0 = run.signal(f"c{cid}", signal.SIGKILL)
    old = run.procs[f"c{cid}"].pid
    run.wait(lambda: run.exited(f"c{cid}", old), 10, f"collector {cid}'s process to die")
    run.start_collector(cid)  # at once: before the learner can notice the death
    recover = run.recovered(cid, t0, version=run.version)
    report = [m for m in run.find("L", "round", t0) if str(cid) in m["failed"]]
    detect = report[0]["t"] - t0 if report else None
    run.settle()
    return Outcome(detect, recover, "killed and started again at once; "
                   + ("the learner reported the old one" if report else
                      "the new incarnation replaced the old one without a failure report"),
                   affected=(cid,))


def collector_stop(run: Run) -> Outcome:
    cid = run.target
    t0 = run.signal(f"c{cid}", signal.SIGSTOP)
    detect, how = run.reported(cid, t0)
    run.idle(max(0.0, t0 + run.opts.liveness + 2 - time.time()))
    t1 = run.signal(f"c{cid}", signal.SIGCONT)
    recover = run.recovered(cid, t1, version=run.version)
    run.settle()
    ends = run.ends(cid, t1)
    how_back = (f"its stream ended ({ends[0]['kind']}) and it joined again" if ends
                else "it went on on its own link")
    return Outcome(detect, recover, f"frozen {t1 - t0:.1f}s; reported by {how}; after "
                   f"SIGCONT {how_back}", affected=(cid,))


def _on_host(run: Run, host: int) -> list[int]:
    return [c for c, h in run.layout.items() if h == host]


def link_cut(run: Run) -> Outcome:
    cids = _on_host(run, LINK_HOST)
    t0 = time.time()
    run.bed.cut(LINK_HOST)
    detect, how = run.reported(cids[0], t0)
    # keep it cut until the cut-off collectors noticed it too
    run.wait(lambda: all(run.ends(c, t0) or run.find(f"c{c}", "lost", t0) for c in cids),
             run.opts.learner_timeout + run.opts.margin_s,
             f"collectors {cids} to notice the cut")
    seen = max(min(m["t"] for m in run.ends(c, t0) + run.find(f"c{c}", "lost", t0))
               for c in cids) - t0
    run.bed.restore(LINK_HOST)
    t1 = time.time()
    recover = max(run.recovered(c, t1, version=run.version) for c in cids)
    run.settle()
    return Outcome(detect, recover, f"cut {t1 - t0:.1f}s; the learner reported it by "
                   f"{how}, the cut-off side after {seen:.1f}s; recover: from the "
                   f"restore", affected=tuple(cids))


def link_flap(run: Run) -> Outcome:
    cids = _on_host(run, LINK_HOST)
    t0 = time.time()
    for _ in range(4):
        run.bed.flap(LINK_HOST, 0.5).join(10)
        run.idle(1.0)
    t1 = time.time()
    recover = max(run.recovered(c, t1 - 1.0, version=run.version) for c in cids)
    run.settle()
    reports = [m for m in run.find("L", "round", t0)
               if any(str(c) in m["failed"] for c in cids)]
    detect = reports[0]["t"] - t0 if reports else None
    return Outcome(detect, recover, "4 flaps of 0.5 s down, 1 s up (shorter than the "
                   "liveness bound): " + ("reported failed, rejoined" if reports
                                          else "not reported, no version lost"),
                   affected=tuple(cids))


def slow_link(run: Run) -> Outcome:
    cids = _on_host(run, SLOW_HOST)
    before = [m["wait_s"] for m in run.find("L", "round")][-10:]
    t0 = time.time()
    timer = run.bed.throttle(SLOW_HOST, run.opts.slow_rate, 4.0)
    run.idle(4.0)
    timer.join(10)
    t1 = time.time()
    during = [m["wait_s"] for m in run.find("L", "round", t0) if m["t"] <= t1]
    recover = max(run.recovered(c, t1, version=run.version + 1) for c in run.layout)
    run.settle()
    reports = [m for m in run.find("L", "round", t0) if m["failed"] or m["lagging"]]
    return Outcome(reports[0]["t"] - t0 if reports else None, recover,
                   f"host {SLOW_HOST} at {run.opts.slow_rate} for 4 s: round "
                   f"{statistics.median(before) * 1000:.0f} ms -> worst "
                   f"{max(during, default=0) * 1000:.0f} ms; "
                   + (f"reported {reports[0]['failed'] or reports[0]['lagging']}" if reports
                      else "nobody reported failed"), affected=tuple(cids))


def _kill_learner_mid(run: Run) -> float:
    head = run.target
    run.tell(f"c{head}", f"kill_learner {run.learner_pid}")
    mid = run.wait(lambda: run.find(f"c{head}", "mid"), 10 + run.opts.margin_s,
                   f"the learner to be caught mid-transfer by collector {head}")[-1]
    run.wait(lambda: run.exited("L"), 10, "the learner's process to die")
    return float(mid["t"])


def learner_kill(run: Run) -> Outcome:
    t0 = _kill_learner_mid(run)
    cids = sorted(run.layout)
    run.wait(lambda: all(run.ends(c, t0) for c in cids),
             run.opts.learner_timeout + run.opts.timeout + run.opts.margin_s,
             "every collector to end its stream")
    ends = {c: run.ends(c, t0)[0] for c in cids}
    kinds = {e["kind"] for e in ends.values()}
    if not kinds <= {"PeerGone", "ConnectionFailed"}:
        raise CellFailed(f"collectors ended with {sorted(kinds)}, not PeerGone")
    detect = max(e["t"] for e in ends.values()) - t0
    run.wait(lambda: all(run.exited(f"c{c}") for c in cids), 10, "the collectors to exit")
    return Outcome(detect, None, f"every collector raised {'/'.join(sorted(kinds))} and "
                   f"exited (the stream ends by design without reattach_timeout)",
                   all_affected=True, went_on=False)


def learner_kill_reattach(run: Run) -> Outcome:
    t0 = _kill_learner_mid(run)
    run.start_learner()  # at the same address, from the checkpoint
    cids = sorted(run.layout)
    run.wait(lambda: run.find("L", "connected", t0), run.opts.connect_timeout
             + run.opts.margin_s, "the new learner to take its collectors back")
    recover = max(run.recovered(c, t0, version=run.find("L", "connected", t0)[0]["v"])
                  for c in cids)
    lost = [run.find(f"c{c}", "lost", t0) for c in cids]
    detect = max(m[0]["t"] for m in lost) - t0 if all(lost) else None
    restarts = [c for c in cids if run.find(f"c{c}", "joined", t0)]
    if restarts:
        raise CellFailed(f"collectors {restarts} had to join anew instead of re-attaching: "
                         f"{[run.ends(c, t0)[0]['kind'] for c in restarts]}")
    run.settle()
    return Outcome(detect, recover, "a new learner started at once from the checkpoint; "
                   "every collector re-attached in its process", all_affected=True)


def learner_stop(run: Run) -> Outcome:
    cids = sorted(run.layout)
    t0 = run.signal("L", signal.SIGSTOP)
    run.wait(lambda: all(run.find(f"c{c}", "lost", t0) or run.ends(c, t0) for c in cids),
             run.opts.learner_timeout + run.opts.margin_s, "every collector to notice")
    detect = max(min(m["t"] for m in run.find(f"c{c}", "lost", t0) + run.ends(c, t0))
                 for c in cids) - t0
    run.idle(max(0.0, t0 + run.opts.learner_timeout + 2 - time.time()))
    t1 = run.signal("L", signal.SIGCONT)
    recover = max(run.recovered(c, t1, version=run.version + 1) for c in cids)
    run.settle()
    return Outcome(detect, recover, f"frozen {t1 - t0:.1f}s; collectors with "
                   f"reattach_timeout noticed, then took the same learner back after "
                   f"SIGCONT; recover: from SIGCONT", all_affected=True)


def bit_flip(run: Run) -> Outcome:
    cid = run.target
    run.tell(f"c{cid}", "flip 3")
    flips = run.wait(lambda: len(run.find(f"c{cid}", "flipped")) >= 3 and
                     run.find(f"c{cid}", "flipped"), 20 + run.opts.margin_s,
                     f"3 corrupted messages at collector {cid}")
    delays = [run.recovered(cid, f["t"], version=f["v"]) for f in flips]
    run.settle()
    check = ("with a secret: lent messages are checked by digest only" if run.secret
             else "checksum")
    return Outcome(None, max(delays), f"one bit flipped in 3 messages after delivery "
                   f"({check}); recover: until the version was applied intact",
                   affected=(cid,))


def wrong_secret(run: Run) -> Outcome:
    spare = run.n
    t0 = time.time()
    run.start_collector(spare, host=LINK_HOST, secret="not the secret", rejoin=False)
    end = run.wait(lambda: run.ends(spare), run.opts.connect_timeout + run.opts.margin_s,
                   "the wrong-secret joiner to be refused")[0]
    if end["kind"] != "AuthenticationError":
        raise CellFailed(f"the joiner with a wrong secret ended with {end['kind']}: "
                         f"{end['why']}")
    joining = run.find(f"c{spare}", "joining")[0]["t"]
    run.settle()
    return Outcome(end["t"] - joining, None, f"refused with AuthenticationError "
                   f"{end['t'] - joining:.2f}s after its join started ({end['t'] - t0:.1f}s "
                   f"after its process started)")


def store_garbage(run: Run) -> Outcome:
    t0 = time.time()
    run.start_garbage(LINK_HOST, spare=run.n, count=200)
    wrote = run.wait(lambda: run.find("G", "wrote"), 60, "the garbage writer")[0]
    run.garbage_keys = wrote["keys"]
    run.settle(10)
    waits = [m["wait_s"] for m in run.find("L", "round", t0)]
    return Outcome(None, None, f"{wrote['keys']} keys written (200 random, and join "
                   f"counters, malformed hellos and heartbeats of an unserved id); worst "
                   f"round since {max(waits) * 1000:.0f} ms")


def full_shm(run: Run) -> Outcome:
    run.start_learner()
    run.strict = False
    run.wait(lambda: run.find("L", "up") or run.find("L", "error") or run.exited("L"), 60,
             "the learner to start or refuse")
    run.strict = True
    refused = run.find("L", "error")
    if refused and run.transport == "shm" and refused[0]["kind"] == "SharedMemoryFull":
        run.wait(lambda: run.exited("L"), 10, "the refusing learner to exit")
        return Outcome(None, None, f"transport='shm' asked for explicitly: refused at "
                       f"construction, typed: {refused[0]['kind']}: {refused[0]['why']}",
                       went_on=False)
    if refused:
        raise CellFailed(f"the learner failed at {refused[0]['where']}: {refused[0]['kind']}: "
                         f"{refused[0]['why']}")
    run.learner_pid = run.find("L", "up")[-1]["pid"]
    for cid in run.layout:
        run.start_collector(cid)
    run.settle(5, connect=True)
    transports = run.find("L", "connected")[0]["transports"]
    run.settle(10)
    return Outcome(None, None, "/dev/shm of every host 8 MiB and full before the start; "
                   f"transports chosen: {transports}")


def join_flood(run: Run) -> Outcome:
    hosts = sorted(set(run.layout.values()))
    base = run.version
    t0 = time.time()
    new = list(range(run.n, run.n + 10))
    for i, cid in enumerate(new):
        run.start_collector(cid, host=hosts[i % len(hosts)])
    joined = run.wait(lambda: all(run.applied(c) for c in new) and
                      [run.applied(c)[0]["t"] for c in new],
                      run.opts.connect_timeout + 30, "10 new collectors to join")
    t1 = max(joined)
    during = [m["wait_s"] for m in run.find("L", "round", t0) if m["t"] <= t1]
    run.settle(5, cids=sorted(run.layout) + new)
    return Outcome(None, t1 - t0, f"10 processes started at once (versions {base} to "
                   f"{run.version} meanwhile); worst round while they joined "
                   f"{max(during, default=0) * 1000:.0f} ms")


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    script: Callable[[Run], Outcome]
    detect: str
    recover: str
    run_kw: dict[str, Any] = dataclasses.field(default_factory=dict)
    quick: bool = False
    own_start: bool = False
    """The script starts the learner and collectors itself."""
    applies: Callable[[str], str | None] = lambda transport: None
    fill_shm: bool = False


def _remote_only(transport: str) -> str | None:
    if transport == "shm":
        return ("a link fault reaches only collectors on other hosts, which shm serves by "
                "its fallback: see the distributed column")
    return None


SCENARIOS = [
    Scenario("kill_idle", "collector SIGKILL, idle", kill_idle,
             "learner reports it", "a new process with its id is current"),
    Scenario("kill_mid", "collector SIGKILL mid-transfer", kill_mid,
             "learner reports it", "a new process with its id is current", quick=True),
    Scenario("collector_stop", "collector SIGSTOP past the liveness bound, SIGCONT",
             collector_stop, "learner reports it", "from SIGCONT: it applies again",
             quick=True),
    Scenario("link_cut", "collector host's link cut, restored", link_cut,
             "learner reports it", "from the restore: it applies again", quick=True,
             applies=_remote_only),
    Scenario("link_flap", "link flapping (4 x 0.5 s down)", link_flap,
             "learner reports it (if it does)", "from the last restore: current",
             applies=_remote_only),
    Scenario("slow_link", "slow link (rate / 10) under one relay", slow_link,
             "learner reports it (if it does)", "from the end: all current",
             applies=_remote_only),
    Scenario("learner_kill", "learner SIGKILL mid-transfer", learner_kill,
             "collectors raise", "— (ends by design)", run_kw={"rejoin": False}),
    Scenario("learner_kill_reattach", "learner SIGKILL mid-transfer, reattach_timeout",
             learner_kill_reattach, "collectors notice", "all re-attached to a new learner",
             run_kw={"rejoin": False, "reattach": 60.0}, quick=True),
    Scenario("learner_stop", "learner SIGSTOP past the bound, SIGCONT", learner_stop,
             "collectors notice", "from SIGCONT: all apply again",
             run_kw={"reattach": 60.0}),
    Scenario("bit_flip", "message corrupted in transit (bit flip)", bit_flip,
             "—", "the version applied intact", quick=True),
    Scenario("wrong_secret", "collector joins with a wrong secret", wrong_secret,
             "joiner refused", "—", run_kw={"secret": SECRET, "extra": 1}),
    Scenario("store_garbage", "foreign process writes garbage to the store", store_garbage,
             "—", "—", run_kw={"extra": 1}),
    Scenario("full_shm", "full /dev/shm", full_shm, "—", "—", fill_shm=True, own_start=True),
    Scenario("restart_same_id", "collector restarted with the same id", restart_same_id,
             "learner reports the old one", "the new process is current", quick=True),
    Scenario("join_flood", "10 collectors join at once", join_flood, "—",
             "all 10 joined", run_kw={"extra": 10}),
]


# -- one cell ----------------------------------------------------------------------------
def unknown_transport(name: str) -> str | None:
    """Why the library here cannot run ``name``, or ``None``."""
    from weight_sync.config import SenderConfig
    from weight_sync.errors import WeightSyncError
    from weight_sync.transports.registry import sender_chain

    try:
        sender_chain(SenderConfig(transport=name))
    except WeightSyncError as exc:
        return f"transport {name!r} is not available in this checkout ({exc})"
    return None


def _fill_shm(bed: TestBed) -> None:
    for host in bed.hosts:
        host.run(["sh", "-c", "mount -o remount,size=8m /dev/shm && "
                  f"(dd if=/dev/zero of=/dev/shm/{SHM_FILL} bs=64k 2>/dev/null; true)"],
                 timeout=30, check=True)


def run_cell(scenario: Scenario, transport: str, opts: Options) -> dict[str, Any]:
    cell: dict[str, Any] = {"scenario": scenario.name, "transport": transport}
    na = scenario.applies(transport)
    if na is not None:
        return {**cell, "status": "n/a", "reason": na}
    start = time.monotonic()
    kw = dict(scenario.run_kw)
    if scenario.name == "bit_flip" and transport == "shm":
        kw["secret"] = SECRET  # lent messages are checked by digest, with a secret only
    problems: list[str] = []
    outcome: Outcome | None = None
    try:
        with TestBed(hosts=3, rate=opts.rate) as bed:
            if scenario.fill_shm:
                _fill_shm(bed)
            run = Run(bed, transport, opts, **kw)
            try:
                if not scenario.own_start:
                    run.start()
                outcome = scenario.script(run)
            except (Hang, CellFailed) as exc:
                problems.append(str(exc))
            except TestBedError as exc:
                problems.append(f"test bed: {exc}")
            finally:
                closing = time.monotonic()
                leftovers = run.finish()
                teardown_s = time.monotonic() - closing
            crashed = [f"{t} (pid {p.pid}) exit {p.returncode} {run.when_exited(t, p.pid)}: "
                       f"{run.stderr_tail(t, p)}"
                       for t, p in run.all_procs if p.returncode not in (0, None, -9)
                       and not (t == "L" and p.returncode == -signal.SIGKILL)]
            affected = (sorted(run.layout) if outcome is None or outcome.all_affected
                        else list(outcome.affected))
            healthy = [c for c in sorted(run.layout) if c not in affected]
            missed = {c: g for c, g in run.missed(healthy).items() if g}
            wrong = run.wrong()
            last_rounds = [{k: m[k] for k in ("v", "wait_s", "raised", "failed", "lagging")}
                           for m in run.find("L", "round")[-3:]]
            held = run.find("L", "final")[-1].get("held", []) if run.find("L", "final") else []
            # what the garbage writer wrote under an unserved id is its own
            foreign = f"/{run.n}/" if scenario.name == "store_garbage" else None
            stale = [k for k in _stale_keys(held) if foreign is None or foreign not in k]
    except TestBedError as exc:
        return {**cell, "status": "fail", "reason": f"test bed: {exc}",
                "wall_s": round(time.monotonic() - start, 1)}
    if crashed and not problems:
        problems.append("a process died: " + "; ".join(crashed))
    if wrong:
        problems.append(f"wrong bytes applied: {wrong[:5]}")
    if missed:
        problems.append(f"healthy collectors missed versions: {missed}")
    if leftovers:
        problems.append("left behind: " + "; ".join(leftovers))
    if stale:
        problems.append(f"store keys left behind: {stale[:8]}")
    if problems:
        cell["last_rounds"] = last_rounds
        # beyond the reports wait_ack is for (the collectors leave first at teardown)
        raised = {r["raised"] for r in last_rounds
                  if r["raised"] not in ("", "CollectorFailed", "WeightSyncTimeout")}
        if raised:
            problems.append(f"the learner's last rounds raised {sorted(raised)}")
    out = outcome or Outcome()
    return {**cell, "status": "fail" if problems else "ok",
            "reason": "; ".join(problems), "detect_s": _r(out.detect_s),
            "recover_s": _r(out.recover_s), "went_on": out.went_on and not problems,
            "note": out.note, "missed": sum(missed.values()), "wrong": len(wrong),
            "leftovers": leftovers, "stale_keys": stale, "held_keys": held, "crashed": crashed,
            "teardown_s": round(teardown_s, 1), "wall_s": round(time.monotonic() - start, 1)}


def _stale_keys(held: list[str]) -> list[str]:
    """Keys the store still held at the end that no live collector accounts for: every
    key of an incarnation older than its id's newest (a dead or replaced process), an
    unread hello or verdict, more than the newest two signals or acks of a link."""
    newest: dict[int, int] = {}
    parsed = []
    for key in held:
        parts = key.split("/")
        if len(parts) < 3:  # join/<cid>: one counter per id, kept by design
            continue
        cid, inc = int(parts[1]), int(parts[2])
        newest[cid] = max(newest.get(cid, 0), inc)
        parsed.append((key, parts[0], cid, inc))
    stale = []
    per_link: dict[tuple[str, int, int], int] = {}
    for key, kind, cid, inc in parsed:
        if inc < newest[cid] or kind in ("hello", "admit"):
            stale.append(key)
        elif kind in ("update", "ack", "resend"):
            per_link[(kind, cid, inc)] = per_link.get((kind, cid, inc), 0) + 1
    stale += [f"{n} {kind} keys of {cid}/{inc}" for (kind, cid, inc), n in per_link.items()
              if n > 2]
    return stale


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 2)


# -- the matrix --------------------------------------------------------------------------
def run_matrix(scenarios: list[Scenario], transports: list[str],
               opts: Options) -> list[dict[str, Any]]:
    cells = []
    skipped = {t: unknown_transport(t) for t in transports}
    for scenario in scenarios:
        for transport in transports:
            if skipped[transport] is not None:
                cell = {"scenario": scenario.name, "transport": transport,
                        "status": "skip", "reason": skipped[transport]}
            else:
                cell = run_cell(scenario, transport, opts)
            cells.append(cell)
            print(json.dumps(cell), flush=True)
    return cells


def _sec(x: float | None) -> str:
    return "—" if x is None else f"{x:.1f} s"


def markdown(result: dict[str, Any]) -> str:
    cells = result["cells"]
    config = result["config"]
    transports = config["transports"]
    by = {(c["scenario"], c["transport"]): c for c in cells}
    footnotes: dict[str, int] = {}
    where: dict[str, list[str]] = {}

    def text(cell: dict[str, Any]) -> str:
        if cell["status"] == "ok":
            return f"✓ {_sec(cell.get('detect_s'))} / {_sec(cell.get('recover_s'))}"
        label = {"fail": "✗", "n/a": "n/a", "skip": "skipped"}[cell["status"]]
        key = f"{label}: {cell['reason']}"
        number = footnotes.setdefault(key, len(footnotes) + 1)
        where.setdefault(key, []).append(f"{cell['scenario']} x {cell['transport']}")
        times = ("" if cell.get("detect_s") is None and cell.get("recover_s") is None else
                 f" {_sec(cell.get('detect_s'))} / {_sec(cell.get('recover_s'))}")
        return f"{label} [{number}]{times}"

    lines = [
        "# Fault matrix",
        "",
        f"Generated by `{result['command']}` on {result['date']} "
        f"({float(result['wall_s']) / 60:.1f} min, {result['machine']}). Each cell is a "
        f"short run on the test bed (`testbed/`: 3 simulated hosts, links at "
        f"{config['rate']}): a learner on host 0 publishes a "
        f"{config['numel'] * 4 / 1e6:.0f} MB policy every {config['step_ms']:.0f} ms to 3 "
        f"collectors and waits for their acks; the fault is injected, and every collector "
        f"checks every version it applies against the learner's, byte for byte. "
        f"Bounds: the learner's `liveness_timeout` {config['liveness']} s, the "
        f"collectors' `learner_timeout` {config['learner_timeout']} s.",
        "",
        "✓ *a* / *b*: the run went on (or ended as designed), no wrong byte, no healthy "
        "collector missed a version, nothing left behind (processes, `/dev/shm` "
        "segments, store keys); *a* = time until the side that must notice the fault "
        "reported it, *b* = time until the faulty side recovered or ended (per scenario: "
        "the last two columns). ✗, n/a and skipped cells point to the list below the "
        "table.",
        "",
        "| scenario | " + " | ".join(transports) + " | *a* | *b* |",
        "|---|" + "---|" * (len(transports) + 2),
    ]
    for s in SCENARIOS:
        if not any((s.name, t) in by for t in transports):
            continue
        row = [text(by[(s.name, t)]) if (s.name, t) in by else "" for t in transports]
        lines.append(f"| {s.title} | " + " | ".join(row) + f" | {s.detect} | {s.recover} |")
    lines += [""]
    lines += [f"{n}. {why.split(': ', 1)[0]} ({', '.join(where[why])}): "
              f"{why.split(': ', 1)[1]}" for why, n in footnotes.items()]
    lines += ["", "## Reading", "", *reading(cells), "", "## Notes per cell", ""]
    for c in cells:
        if c.get("note"):
            lines.append(f"- {c['scenario']} x {c['transport']}: {c['note']}")
    return "\n".join(lines) + "\n"


def reading(cells: list[dict[str, Any]]) -> list[str]:
    ran = [c for c in cells if c["status"] in ("ok", "fail")]
    ok = [c for c in ran if c["status"] == "ok"]
    out = [f"- {len(ok)} of {len(ran)} cells that ran are ✓; "
           f"{sum(c.get('wrong', 0) for c in ran)} wrong applies in all (every collector, "
           f"every version, checked by content); "
           f"{sum(c.get('missed', 0) for c in ran)} versions missed by healthy collectors."]
    detects = [c["detect_s"] for c in ran if c.get("detect_s") is not None
               and c["scenario"] in ("kill_idle", "kill_mid", "collector_stop", "link_cut")]
    if detects:
        out.append(f"- A dead, frozen or cut-off collector was reported by the learner's "
                   f"`wait_ack` {min(detects):.1f} to {max(detects):.1f} s after the fault "
                   f"(the liveness bound, or at once for a process on the learner's host "
                   f"whose death is seen by its pid); the other collectors went on meanwhile.")
    kinds = {
        "store keys of a dead or replaced collector process left in the store":
            lambda r: "store keys left behind" in r,
        "`/dev/shm` segments of a killed process left on its host":
            lambda r: "/dev/shm holds" in r,
        "a process aborted (SIGABRT) instead of exiting": lambda r: "exit -6" in r,
        "a run that stopped going on (a wait ran past its bound)":
            lambda r: "not within" in r,
        "a learner that could not start": lambda r: "failed at init" in r,
    }
    for what, test in kinds.items():
        hit = [f"{c['scenario']} x {c['transport']}" for c in ran
               if c["status"] == "fail" and test(c["reason"])]
        if hit:
            out.append(f"- ✗ for {what}: {len(hit)} cell(s) ({', '.join(hit)}).")
    skipped = sorted({c["transport"] for c in cells if c["status"] == "skip"})
    if skipped:
        out.append(f"- Skipped columns: {', '.join(skipped)} (not available in this "
                   f"checkout when the matrix ran).")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.faults",
                                description=__doc__.split("\n\n")[0])
    add = p.add_argument
    add("--quick", action="store_true", help=f"transports {QUICK_TRANSPORTS} x the "
        f"{sum(s.quick for s in SCENARIOS)} scenarios marked quick")
    add("--transports", nargs="+", help=f"default: {TRANSPORTS} (an unknown one is skipped)")
    add("--scenarios", nargs="+", choices=[s.name for s in SCENARIOS])
    add("--json-out", type=Path, default=ROOT / "benchmarks" / "results" / "faults.json")
    add("--md-out", type=Path, default=ROOT / "docs" / "faults.md")
    for field in dataclasses.fields(Options):
        add("--" + field.name.replace("_", "-"), type=type(field.default),
            default=field.default)
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = build_parser().parse_args(argv)
    reason = testbed.available()
    if reason is not None:
        raise SystemExit(f"the test bed cannot run here: {reason}")
    opts = Options(**{f.name: getattr(a, f.name) for f in dataclasses.fields(Options)})
    transports = a.transports or list(QUICK_TRANSPORTS if a.quick else TRANSPORTS)
    scenarios = [s for s in SCENARIOS if (a.scenarios is None and (s.quick or not a.quick))
                 or (a.scenarios is not None and s.name in a.scenarios)]
    start = time.monotonic()
    cells = run_matrix(scenarios, transports, opts)
    wall_s = round(time.monotonic() - start, 1)
    result: dict[str, Any] = {
        "command": "python -m benchmarks.faults" + (" " + " ".join(argv or sys.argv[1:])
                                                    if (argv or sys.argv[1:]) else ""),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{os.cpu_count()} cores",
        "wall_s": wall_s,
        "config": {**dataclasses.asdict(opts), "transports": transports,
                   "scenarios": [s.name for s in scenarios]},
        "cells": cells,
    }
    a.json_out.parent.mkdir(parents=True, exist_ok=True)
    a.json_out.write_text(json.dumps(result, indent=1) + "\n")
    a.md_out.parent.mkdir(parents=True, exist_ok=True)
    a.md_out.write_text(markdown(result))
    print(f"{sum(c['status'] == 'ok' for c in cells)} ok, "
          f"{sum(c['status'] == 'fail' for c in cells)} failed, "
          f"{sum(c['status'] in ('n/a', 'skip') for c in cells)} n/a or skipped; "
          f"{wall_s / 60:.1f} min -> {a.json_out}, {a.md_out}")
    return result


if __name__ == "__main__":
    main()
