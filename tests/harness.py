"""Every child process the tests start: spawned, watched, bounded in time, reaped.

One mechanism throughout. Each child runs its target under :func:`_child_main`, which
sends the return value, or the formatted traceback, over a one-way pipe of its own;
messages a child sends the test travel over pipes too (one writer each). The test
process waits on all of them at once with ``multiprocessing.connection.wait``:
nothing here sleeps or polls. ``Connection.send`` is synchronous, so a report written
just before a SIGKILL is not lost, and a child killed mid-write cannot wedge the
others, as it could while holding a shared queue's lock. A pipe's EOF tells that the
child holding its other end is gone: the parent's copies of the ends it hands a child
are closed once the child started (so give each child its own).

Three shapes:

* :func:`run_processes`: every rank is a child; their return values, in rank order::

      values = run_processes([(work, (0,)), (work, (1,))], timeout=30)

* :func:`spawn_collectors`: the test process plays the learner while the children
  run; their values are gathered when the block exits::

      reader, writer = pipe()
      with spawn_collectors([(collector, (info, 0, writer))], timeout=60) as procs:
          sender.connect(30)
          msg = procs.get(reader, timeout=30)   # fails fast if a child fails meanwhile
      values = procs.results

* :class:`Cluster` (the fault tests): children that may die on purpose, started and
  restarted by collector id while the test plays or watches the learner; their
  reports are kept in a backlog and taken by predicate (:meth:`Cluster.take`).

Guarantees:

* a child's exception comes back as :class:`ChildFailed` carrying its traceback, and
  every other child is killed first (in every shape: a fault test's collector that
  raises fails the test's next wait at once, instead of leaving it to time out);
* :func:`run_processes` and :func:`spawn_collectors`: a child that exits without a
  result (killed, segfault, ``os._exit``) is a failure too; a global ``timeout``
  kills everything and raises :class:`ChildTimeout`, naming the ranks still running;
* :class:`Cluster`: a child may die (the tests kill them); every wait is bounded and
  ends in :class:`ChildTimeout` (everything killed) with the reports received so far;
* every child is joined before returning or raising (``Cluster.shutdown``, run by the
  ``cluster`` fixture, for a cluster): no orphan is ever left.

Targets must be picklable by reference (module-level functions). A child whose target
module imports torch runs with one intra-op thread (``torch.set_num_threads(1)``), so
that N children on a small machine do not oversubscribe it.
"""

from __future__ import annotations

import contextlib
import functools
import multiprocessing as mp
import os
import pickle
import select
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any

__all__ = ["CTX", "ChildFailed", "ChildTimeout", "Cluster", "Msg", "Procs", "free_port",
           "process_gone", "pipe", "recv", "run_processes", "spawn_collectors"]

#: The context every test process, and every pipe or event shared with one, comes from.
CTX = mp.get_context("spawn")

Target = tuple[Callable[..., Any], tuple[Any, ...]]
#: A report a :class:`Cluster` child sent, e.g. ``("applied", cid, version, state, pid)``.
Msg = tuple[Any, ...]

# How long children that reported their result may take to exit before being killed.
_EXIT_GRACE_S = 5.0


class ChildFailed(AssertionError):
    """A child raised, or died without a result; the message carries its traceback."""

    def __init__(self, rank: int, detail: str, name: str = "") -> None:
        who = f" ({name})" if name else ""
        super().__init__(f"child rank {rank}{who} failed:\n{detail}")
        self.rank = rank
        self.detail = detail


class ChildTimeout(AssertionError):
    """A bounded wait ran out; ``ranks`` were still running (they were killed)."""

    def __init__(self, ranks: list[int], timeout: float, what: str, detail: str = "") -> None:
        tail = f"\n{detail}" if detail else ""
        super().__init__(f"timed out after {timeout:.1f}s {what}; ranks still running "
                         f"(killed): {ranks}{tail}")
        self.ranks = ranks


def free_port() -> int:
    """A port nobody listens on right now (bound on port 0, read back, closed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pipe() -> tuple[Connection, Connection]:
    """A one-way pipe ``(reader, writer)``: hand one end to one child."""
    return CTX.Pipe(duplex=False)


def recv(conn: Connection, timeout: float, what: str = "a message") -> Any:
    """In a child: the next message on ``conn`` within ``timeout`` s, else TimeoutError."""
    if not conn.poll(timeout):
        raise TimeoutError(f"nothing on the pipe within {timeout:.1f}s waiting for {what}")
    return conn.recv()


def _child_main(rank: int, fn: Callable[..., Any], args: tuple[Any, ...],
                outcome: Connection) -> None:
    """Run ``fn(*args)``; send ``(True, value)`` or ``(False, traceback)`` on ``outcome``."""
    # By now the target's module is imported (unpickling `fn` did it): if it uses
    # torch, limit it to one thread before any work.
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)
    try:
        report: tuple[bool, Any] = (True, fn(*args))
    except BaseException:
        report = (False, traceback.format_exc())
    try:
        outcome.send(report)  # pickles first: an unpicklable value raises before writing
    except Exception:
        report = (False, traceback.format_exc())
        outcome.send(report)
    outcome.close()
    if not report[0]:
        sys.exit(1)


@dataclass
class _Child:
    rank: int
    process: BaseProcess
    outcome: Connection | None  # the read end, until the outcome (or EOF) was read


class _Children:
    """Spawned children and the pipes they report their outcome on.

    Args:
        deaths_fail: whether a child that exits without a result is a failure.
    """

    def __init__(self, *, deaths_fail: bool) -> None:
        self._deaths_fail = deaths_fail
        self._children: list[_Child] = []
        self._values: dict[int, Any] = {}

    @property
    def processes(self) -> list[BaseProcess]:
        """Every child started, in rank order (restarted ones included)."""
        return [c.process for c in self._children]

    @property
    def pids(self) -> list[int | None]:
        return [c.process.pid for c in self._children]

    def running(self) -> list[int]:
        """Ranks whose outcome (a result, a failure or an exit) is not in yet."""
        return [c.rank for c in self._children if c.outcome is not None]

    def start_process(self, fn: Callable[..., Any], args: tuple[Any, ...] = (),
                      name: str | None = None) -> BaseProcess:
        """Spawn ``fn(*args)`` as the next rank. Connections in ``args`` are handed
        over: the parent's copies are closed once the child started."""
        rank = len(self._children)
        reader, writer = CTX.Pipe(duplex=False)
        proc = CTX.Process(target=_child_main, args=(rank, fn, tuple(args), writer),
                           name=name or f"test-rank-{rank}", daemon=True)
        try:
            proc.start()
        except BaseException:
            reader.close()
            raise
        finally:
            writer.close()
        self._children.append(_Child(rank, proc, reader))
        for arg in args:
            if isinstance(arg, Connection):
                arg.close()
        return proc

    def _watch(self, others: Sequence[Connection], timeout: float) -> list[Connection]:
        """Wait up to ``timeout`` s for an outcome or for one of ``others`` to be ready.

        Outcomes are read here (a failure kills everything and raises
        :class:`ChildFailed`); the ready ones among ``others`` are returned.
        """
        pending = [c for c in self._children if c.outcome is not None]
        ready = wait([*(c.outcome for c in pending if c.outcome is not None), *others],
                     max(timeout, 0))
        for child in pending:
            if child.outcome in ready:
                self._read_outcome(child)
        return [conn for conn in others if conn in ready]

    def _read_outcome(self, child: _Child) -> None:
        assert child.outcome is not None
        ok: bool | None
        try:
            data = child.outcome.recv_bytes()
        except (EOFError, OSError):  # gone without a word (or died mid-write)
            child.process.join(10)
            ok, value = None, (f"exited with code {child.process.exitcode} without "
                               "returning a result")
        else:
            try:
                ok, value = pickle.loads(data)
            except Exception:
                ok, value = False, ("its result could not be unpickled here:\n"
                                    + traceback.format_exc())
        child.outcome.close()
        child.outcome = None
        if ok:
            self._values[child.rank] = value
        elif ok is False or self._deaths_fail:
            self.kill_all()
            raise ChildFailed(child.rank, value, child.process.name)

    def kill_all(self, grace_s: float = 0.0) -> None:
        """Reap every child: wait ``grace_s`` for a clean exit, then SIGKILL; idempotent."""
        deadline = time.monotonic() + grace_s
        for child in self._children:
            child.process.join(max(deadline - time.monotonic(), 0))
        for child in self._children:
            if child.process.is_alive():
                child.process.kill()
        for child in self._children:
            child.process.join(10)
            if child.process.is_alive():  # pragma: no cover - would be an OS problem
                raise RuntimeError(f"rank {child.rank} (pid {child.process.pid}) survived kill")
        for child in self._children:
            if child.outcome is not None:
                child.outcome.close()
                child.outcome = None


class Procs(_Children):
    """Children whose every rank must return a value (see :func:`spawn_collectors`).

    Attributes:
        results: each rank's return value, in rank order, once :meth:`join` returned.
    """

    def __init__(self, targets: Sequence[Target]) -> None:
        super().__init__(deaths_fail=True)
        if not targets:
            raise ValueError("no targets to run")
        self.results: list[Any] = []
        try:
            for fn, args in targets:
                self.start_process(fn, args)
        except BaseException:
            self.kill_all()
            raise

    def check(self) -> None:
        """Raise :class:`ChildFailed` if a child failed so far; never blocks."""
        self._watch([], 0)

    def get(self, conn: Connection, timeout: float, what: str = "a message") -> Any:
        """The next message on ``conn`` within ``timeout`` s, failing fast (and killing
        everything) if a child fails meanwhile or nobody is left to send it."""
        deadline = time.monotonic() + timeout
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ChildTimeout(self.running(), timeout, f"waiting for {what}")
                if self._watch([conn], remaining):
                    try:
                        return conn.recv()
                    except EOFError:
                        raise AssertionError(f"waiting for {what}: the pipe was closed by "
                                             "the child holding it") from None
                if not self.running() and not conn.poll(0):
                    # A child's messages precede its outcome: none can come any more.
                    raise AssertionError(f"waiting for {what}: every child has exited "
                                         f"(results {self._values})")
        except BaseException:
            self.kill_all()
            raise

    def join(self, timeout: float) -> list[Any]:
        """Wait for every result (bounded); kill all on failure or timeout."""
        deadline = time.monotonic() + timeout
        try:
            while self.running():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ChildTimeout(self.running(), timeout, "waiting for the children")
                self._watch([], remaining)
        except BaseException:
            self.kill_all()
            raise
        # Every result is read, so the children exit promptly; a stuck one is killed.
        self.kill_all(grace_s=_EXIT_GRACE_S)
        self.results = [self._values[c.rank] for c in self._children]
        return self.results


def run_processes(targets: Sequence[Target], timeout: float) -> list[Any]:
    """Run each ``(fn, args)`` as a spawned process; return their values in rank order.

    Raises:
        ChildFailed: a child raised or died (the others were killed).
        ChildTimeout: ``timeout`` s passed (everything was killed); names the ranks.
    """
    procs = Procs(targets)
    try:
        return procs.join(timeout)
    finally:
        procs.kill_all()


@contextlib.contextmanager
def spawn_collectors(targets: Sequence[Target], timeout: float) -> Iterator[Procs]:
    """Start the children, run the block (the learner), then gather their results.

    ``timeout`` bounds the gathering after the block. If the block raises, every
    child is killed; a child failure reported within a second is raised instead of
    the block's error (it is usually the cause: a learner waiting on a dead collector).
    """
    procs = Procs(targets)
    try:
        yield procs
    except BaseException as exc:
        try:
            # Give a failing child a moment to report: its traceback beats ours.
            end = time.monotonic() + 1.0
            while procs.running() and (remaining := end - time.monotonic()) > 0:
                procs._watch([], remaining)
        except ChildFailed as child_exc:
            raise child_exc from exc
        finally:
            procs.kill_all()
        raise
    try:
        procs.join(timeout)
    finally:
        procs.kill_all()


class Cluster(_Children):
    """Collectors (and learners) the fault tests start, kill and restart, the pipes they
    report on, and their reaping.

    A collector target is called ``target(info, cid, out, cmds, *extra)``: it reports
    tuples on ``out`` (``("applied", cid, version, state, pid)``, ``("exit", cid, ...)``)
    and reads commands (``"pause"``, ``"resume"``, ``"stop"``) from ``cmds``; the
    test sends them with ``cluster.cmds[cid].send(...)``. A learner target is called
    ``learner(out, go, *args)`` and publishes when told on ``go``.

    Args:
        collector: the target :meth:`start` runs when given none.
        learner: the target :meth:`start_learner` runs.
    """

    def __init__(self, collector: Callable[..., Any] | None = None,
                 learner: Callable[..., Any] | None = None) -> None:
        super().__init__(deaths_fail=False)
        self.collector, self.learner = collector, learner
        self.readers: list[Connection] = []
        self.procs: dict[int, BaseProcess] = {}  # collector id -> its latest process
        self.cmds: dict[int, Connection] = {}
        self.backlog: list[Msg] = []
        self._conns: list[Connection] = []  # the parent's ends, closed at shutdown

    def pipe(self) -> Connection:
        """A new report pipe: the read end is watched, the write end is returned (hand
        it to one child through :meth:`start_process`)."""
        reader, writer = CTX.Pipe(duplex=False)
        self.readers.append(reader)
        return writer

    def start(self, info: Any, cid: int, target: Callable[..., Any] | None = None,
              extra: tuple[Any, ...] = ()) -> BaseProcess:
        """Start collector ``cid`` (a restart if it ran before) on ``target``."""
        target = target or self.collector
        if target is None:
            raise TypeError("Cluster.start: no target given and no default collector")
        cmd_reader, cmd_writer = CTX.Pipe(duplex=False)
        proc = self.start_process(target, (info, cid, self.pipe(), cmd_reader, *extra),
                                  f"collector-{cid}")
        old = self.cmds.get(cid)
        if old is not None:  # a restart: the previous process's commands are moot
            old.close()
        self.procs[cid], self.cmds[cid] = proc, cmd_writer
        return proc

    def start_learner(self, *args: Any, **kwargs: Any) -> tuple[BaseProcess, Connection]:
        """A learner child, ``learner(out, go, *args, **kwargs)``, and ``go``'s write end
        (the pipe that tells it to publish)."""
        if self.learner is None:
            raise TypeError("Cluster.start_learner: no learner target")
        target = functools.partial(self.learner, **kwargs) if kwargs else self.learner
        go_reader, go_writer = CTX.Pipe(duplex=False)
        proc = self.start_process(target, (self.pipe(), go_reader, *args), "learner")
        self._conns.append(go_writer)
        return proc, go_writer

    def kill(self, cid: int) -> None:
        """SIGKILL collector ``cid`` and reap it."""
        proc = self.procs[cid]
        assert proc.pid is not None
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(10)
        assert not proc.is_alive()

    def _pull(self, timeout: float) -> None:
        """Move every report that arrives within ``timeout`` s into the backlog."""
        for reader in self._watch(self.readers, timeout):
            try:
                self.backlog.append(reader.recv())
            except (EOFError, OSError):  # the child is gone (or died mid-write)
                self.readers.remove(reader)
                reader.close()

    def take(self, pred: Callable[[Msg], bool], timeout: float, what: str,
             pump: Callable[[], Any] | None = None) -> Msg:
        """The first report matching ``pred`` (others kept for later).

        ``pump`` (e.g. the sender's ``wait_ack`` with a short timeout) runs between
        waits when the learner must act for the report to come.

        Raises:
            ChildFailed: a child raised meanwhile (everything was killed).
            ChildTimeout: none came within ``timeout`` s, or no child is left that
                could send one (everything was killed); lists the backlog.
        """
        deadline = time.monotonic() + timeout
        try:
            while True:
                for i, msg in enumerate(self.backlog):
                    if pred(msg):
                        return self.backlog.pop(i)
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self.readers:
                    gone = "" if self.readers else " (every report pipe is closed)"
                    raise ChildTimeout(self.running(), timeout, f"waiting for {what}{gone}",
                                       f"backlog: {self.backlog}")
                if pump is not None:
                    pump()
                    self._pull(min(remaining, 0.5))
                else:
                    self._pull(remaining)
        except (ChildFailed, ChildTimeout):
            self.kill_all()
            raise

    def applied(self, cid: int, version: int, timeout: float = 30.0) -> Msg:
        """Collector ``cid``'s report of applying ``version`` or newer (not an error)."""
        msg = self.take(lambda m: m[0] in ("applied", "error") and m[1] == cid
                        and (m[0] == "error" or m[2] >= version), timeout,
                        f"collector {cid} to apply version {version}")
        assert msg[0] == "applied", msg
        return msg

    def applies(self, cid: int) -> list[int]:
        """Versions collector ``cid`` reported applied so far (drains the backlog)."""
        got = [m[2] for m in self.backlog if m[0] == "applied" and m[1] == cid]
        self.backlog = [m for m in self.backlog if not (m[0] == "applied" and m[1] == cid)]
        return got

    def collect_for(self, seconds: float) -> None:
        """Gather every report sent in the next ``seconds`` (to check what did *not*
        arrive, e.g. no stale version)."""
        end = time.monotonic() + seconds
        while (remaining := end - time.monotonic()) > 0 and self.readers:
            self._pull(remaining)

    def stop(self, *cids: int) -> None:
        """Ask collectors to stop and wait for each one's exit report."""
        for cid in cids:
            self.cmds[cid].send("stop")
        for cid in cids:
            self.take(lambda m, c=cid: m[0] == "exit" and m[1] == c, 30, f"{cid} to exit")

    def shutdown(self) -> None:
        """Kill and join every child, close every pipe, check that none is alive."""
        self.kill_all()
        alive = [p.pid for p in self.processes if p.is_alive()]
        for conn in [*self.cmds.values(), *self.readers, *self._conns]:
            conn.close()
        assert not alive, f"processes left alive: {alive}"


def process_gone(pid: int | None, timeout: float = 0.0) -> bool:
    """True once process ``pid`` has ended (waits up to ``timeout`` s on its pidfd)."""
    assert pid is not None
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        readable, _, _ = select.select([fd], [], [], timeout)
        return bool(readable)
    finally:
        os.close(fd)
