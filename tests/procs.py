"""Run test functions as real processes (``spawn``), with tracebacks and hard bounds.

The one helper every multi-process test uses. Two shapes:

* :func:`run_processes` — every rank is a child; returns their return values in rank
  order::

      values = run_processes([(work, (0,)), (work, (1,))], timeout=30)

* :func:`spawn_collectors` — the test process itself plays the learner while the
  children are collectors; results are gathered when the block exits::

      with spawn_collectors([(collector, (info, 0, q))], timeout=60) as procs:
          sender.connect(30)
          msg = procs.get(q, timeout=30)      # waits on a queue, fails fast if a child died
      values = procs.results

Guarantees, both shapes:

* each child's return value, or its formatted traceback, comes back through a queue;
* on the first failure (exception, or a child dying without a result) every other
  child is killed and :class:`ChildFailed` is raised with the child's traceback;
* a global ``timeout`` kills everything and raises :class:`ChildTimeout` naming the
  ranks still running;
* every child is joined before returning or raising: no orphan is ever left.

Targets must be picklable by reference (module-level functions). Children run with
one intra-op thread (``torch.set_num_threads(1)``) when they use torch, so that N
children on a small machine do not oversubscribe it.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import queue as queue_mod
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["CTX", "ChildFailed", "ChildTimeout", "Procs", "free_port", "run_processes",
           "spawn_collectors"]

#: The context every test process and every queue/event shared with one comes from.
CTX = mp.get_context("spawn")

Target = tuple[Callable[..., Any], tuple[Any, ...]]

# How long a child that exited may take for its result to show up on the queue
# (the queue's feeder thread flushes it at exit, after the process looks dead).
_EXIT_GRACE_S = 2.0
_POLL_S = 0.05


class ChildFailed(AssertionError):
    """A child raised or died; the message carries its traceback."""

    def __init__(self, rank: int, detail: str) -> None:
        super().__init__(f"child rank {rank} failed:\n{detail}")
        self.rank = rank
        self.detail = detail


class ChildTimeout(AssertionError):
    """The global timeout ran out; ``ranks`` were still running (they were killed)."""

    def __init__(self, ranks: list[int], timeout: float, what: str) -> None:
        super().__init__(f"timed out after {timeout:.1f}s {what}; ranks still running "
                         f"(killed): {ranks}")
        self.ranks = ranks


def _child_main(rank: int, fn: Callable[..., Any], args: tuple[Any, ...],
                results: Any) -> None:
    # By now the target's module is imported (unpickling `fn` did it): if it uses
    # torch, limit it to one thread before any work.
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)
    try:
        value = fn(*args)
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
    else:
        try:
            results.put((rank, True, value))
        except Exception:  # unpicklable return value: report it, do not hang
            results.put((rank, False, traceback.format_exc()))
    # Make sure the result is flushed to the pipe before the process exits.
    results.close()
    results.join_thread()


@dataclass
class _Child:
    rank: int
    process: Any  # mp.process.BaseProcess


class Procs:
    """Handle on a set of running children (see :func:`spawn_collectors`).

    Attributes:
        results: each rank's return value, in rank order, once :meth:`join` returned.
    """

    def __init__(self, targets: Sequence[Target]) -> None:
        if not targets:
            raise ValueError("no targets to run")
        self._queue = CTX.Queue()
        self._children: list[_Child] = []
        self._values: dict[int, Any] = {}
        self._dead_since: dict[int, float] = {}
        self.results: list[Any] = []
        try:
            for rank, (fn, args) in enumerate(targets):
                proc = CTX.Process(target=_child_main, args=(rank, fn, tuple(args), self._queue),
                                   name=f"test-rank-{rank}", daemon=True)
                proc.start()
                self._children.append(_Child(rank, proc))
        except BaseException:
            self.kill()
            raise

    @property
    def processes(self) -> list[Any]:
        return [c.process for c in self._children]

    @property
    def pids(self) -> list[int | None]:
        return [c.process.pid for c in self._children]

    def running(self) -> list[int]:
        """Ranks that have not reported a result yet."""
        return [c.rank for c in self._children if c.rank not in self._values]

    def _drain(self, block_s: float) -> None:
        """Read results for up to ``block_s``; raise :class:`ChildFailed` on a failure."""
        try:
            rank, ok, value = self._queue.get(timeout=block_s) if block_s > 0 \
                else self._queue.get_nowait()
        except queue_mod.Empty:
            pass
        else:
            if not ok:
                self.kill()
                raise ChildFailed(rank, value)
            self._values[rank] = value
            return
        # A child gone without a result (killed, segfault, os._exit) is a failure too,
        # once its result had time to arrive.
        now = time.monotonic()
        for child in self._children:
            if child.rank in self._values or child.process.is_alive():
                continue
            since = self._dead_since.setdefault(child.rank, now)
            if now - since > _EXIT_GRACE_S:
                self.kill()
                raise ChildFailed(child.rank, f"exited with code {child.process.exitcode} "
                                              "without returning a result")

    def check(self) -> None:
        """Raise :class:`ChildFailed` if a child failed so far; never blocks long."""
        self._drain(0)

    def get(self, q: Any, timeout: float, what: str = "a message") -> Any:
        """``q.get`` bounded by ``timeout``, failing fast if a child fails meanwhile."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return q.get(timeout=_POLL_S)
            except queue_mod.Empty:
                pass
            self._drain(0)
            if time.monotonic() > deadline:
                self.kill()
                raise ChildTimeout(self.running(), timeout, f"waiting for {what}")

    def join(self, timeout: float) -> list[Any]:
        """Wait for every result (bounded); kill all on failure or timeout."""
        deadline = time.monotonic() + timeout
        try:
            while self.running():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ChildTimeout(self.running(), timeout, "waiting for the children")
                self._drain(min(remaining, 0.2))
        except BaseException:
            self.kill()
            raise
        # Every result is read, so the children exit promptly; a stuck one is killed.
        self.kill(grace_s=5.0)
        self.results = [self._values[c.rank] for c in self._children]
        return self.results

    def kill(self, grace_s: float = 0.0) -> None:
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
        with contextlib.suppress(Exception):
            self._queue.cancel_join_thread()


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
        procs.kill()


@contextlib.contextmanager
def spawn_collectors(targets: Sequence[Target], timeout: float) -> Iterator[Procs]:
    """Start the children, run the block (the learner), then gather their results.

    ``timeout`` bounds the gathering after the block. If the block raises, every
    child is killed; a child failure already reported is raised instead of the
    block's error (it is usually the cause: a learner waiting on a dead collector).
    """
    procs = Procs(targets)
    try:
        yield procs
    except BaseException as exc:
        try:
            # Give a failing child a moment to report: its traceback beats ours.
            end = time.monotonic() + 1.0
            while procs.running() and time.monotonic() < end:
                procs._drain(0.1)
        except ChildFailed as child_exc:
            raise child_exc from exc
        finally:
            procs.kill()
        raise
    try:
        procs.join(timeout)
    finally:
        procs.kill()


def free_port() -> int:
    """A port nobody listens on right now (bound on port 0, read back, closed)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])

