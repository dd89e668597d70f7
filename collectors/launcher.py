"""Starting collectors: a small :class:`Launcher` protocol and local processes.

The :class:`~weight_sync.collectors.group.CollectorGroup` asks its launcher for one
:class:`WorkerHandle` per :class:`~weight_sync.collectors.worker.WorkerSpec` and from then on
talks to
the handles and the launcher only: wait for any handle to have a message or to end
(:meth:`Launcher.wait`), read its messages (:meth:`WorkerHandle.receive`), give back
credits, ask it to stop, terminate it if it does not, and release what is left
(:meth:`WorkerHandle.close`, :meth:`Launcher.shutdown`). :class:`LocalLauncher` (the
default) starts ``multiprocessing`` processes with the ``spawn`` method and brings their
messages back over a pipe; :class:`~weight_sync.collectors.ray_launcher.RayLauncher` (the ``ray``
extra) runs collectors as Ray actors and brings them back through Ray's object store.
"""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Sequence
from multiprocessing.connection import Connection, wait
from typing import Any, Protocol, runtime_checkable

from weight_sync.collectors.errors import describe_exitcode
from weight_sync.collectors.worker import WorkerSpec, process_main

__all__ = ["Launcher", "LocalLauncher", "LocalWorker", "WorkerHandle"]


@runtime_checkable
class WorkerHandle(Protocol):
    """The learner's handle on one running collector."""

    worker_id: int

    @property
    def pid(self) -> int | None:
        """The collector's process id (``None`` while not known yet)."""

    @property
    def exitcode(self) -> int | None:
        """``None`` while running (or when the launcher cannot know it); negative:
        killed by that signal."""

    def end_reason(self) -> str:
        """Why the collector ended, for error messages (``"killed by SIGKILL"``,
        ``"exit code 1"``, ``"actor died: ..."``)."""

    def receive(self) -> bytes | bytearray | None:
        """The next message the collector sent, without waiting; ``None`` if none is
        there now.

        Raises:
            EOFError: every message was read and the collector's channel is closed
                (it ended, on purpose or not).
        """

    def is_alive(self) -> bool: ...

    def release_credit(self) -> None:
        """Allow the worker one more batch in flight."""

    def request_stop(self) -> None:
        """Ask the worker to stop after its current step."""

    def join(self, timeout: float) -> None: ...

    def terminate(self) -> None: ...

    def kill(self) -> None: ...

    def close(self) -> None:
        """Release the learner's end of the channel (and what is left of an ended
        collector); nothing is received afterwards."""


class Launcher(Protocol):
    """Starts collectors, waits on them, releases them; see :class:`LocalLauncher`.

    A launcher serves one group at a time: :meth:`shutdown` ends everything it started.
    """

    def launch(self, spec: WorkerSpec, max_inflight: int) -> WorkerHandle:
        """Start the collector of ``spec`` allowing ``max_inflight`` untaken batches."""
        ...

    def wait(self, workers: Sequence[WorkerHandle], timeout: float) -> list[WorkerHandle]:
        """Wait up to ``timeout`` s until any of ``workers`` (handles this launcher
        made) has a message or has ended; return those that have (maybe none)."""
        ...

    def shutdown(self, timeout: float) -> None:
        """Stop what this launcher started and still runs (waiting up to ``timeout`` s
        before killing it) and release what it holds; the group calls it last in its
        ``close``."""
        ...


class LocalWorker:
    """A collector running as a local ``multiprocessing`` process."""

    def __init__(self, worker_id: int, process: Any, connection: Connection, stop: Any,
                 credits: Any) -> None:
        self.worker_id = worker_id
        self._process = process
        self._connection = connection
        self._stop = stop
        self._credits = credits

    @property
    def pid(self) -> int | None:
        return int(self._process.pid) if self._process.pid is not None else None

    @property
    def exitcode(self) -> int | None:
        code = self._process.exitcode
        return None if code is None else int(code)

    @property
    def sentinel(self) -> int:
        """Waitable with ``multiprocessing.connection.wait``; ready once the process ended."""
        return int(self._process.sentinel)

    @property
    def connection(self) -> Connection:
        """Read end of the worker's messages (see :mod:`weight_sync.collectors.batch_messages`)."""
        return self._connection

    def end_reason(self) -> str:
        return describe_exitcode(self.exitcode)

    def receive(self) -> bytes | None:
        if self._connection.poll(0):
            return self._connection.recv_bytes()  # EOFError once the child closed its end
        if not self._process.is_alive():
            raise EOFError(f"collector {self.worker_id} ended")
        return None

    def is_alive(self) -> bool:
        return bool(self._process.is_alive())

    def release_credit(self) -> None:
        self._credits.release()

    def request_stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float) -> None:
        self._process.join(timeout)

    def terminate(self) -> None:
        self._process.terminate()

    def kill(self) -> None:
        self._process.kill()

    def close(self) -> None:
        self._connection.close()

    def __repr__(self) -> str:
        return (f"LocalWorker(id={self.worker_id}, pid={self.pid}, "
                f"alive={self._process.is_alive()})")


class LocalLauncher:
    """Starts each collector as a local process.

    Args:
        start_method: ``"spawn"`` (default: a fresh interpreter, nothing inherited but
            the spec), or ``"forkserver"``; ``"fork"`` is unsafe with threads and torch.
        daemon: mark processes daemonic, so that the interpreter's exit terminates them
            even if the group was never closed. Set ``False`` if an environment starts
            processes of its own (daemonic processes cannot have children).
    """

    def __init__(self, start_method: str = "spawn", daemon: bool = True) -> None:
        self._ctx: Any = mp.get_context(start_method)
        self.daemon = daemon

    def launch(self, spec: WorkerSpec, max_inflight: int) -> LocalWorker:
        reader, writer = self._ctx.Pipe(duplex=False)
        stop = self._ctx.Event()
        credits = self._ctx.Semaphore(max_inflight)
        process = self._ctx.Process(
            target=process_main, args=(spec, writer, stop, credits),
            name=f"collector-{spec.worker_id}", daemon=self.daemon)
        process.start()
        # Only the child may hold the write end: its exit then reads as EOF here.
        writer.close()
        return LocalWorker(spec.worker_id, process, reader, stop, credits)

    def wait(self, workers: Sequence[WorkerHandle], timeout: float) -> list[WorkerHandle]:
        """Wait on the workers' pipes and process sentinels together (one ``wait`` call)."""
        by_object: dict[Any, LocalWorker] = {}
        for w in workers:
            if not isinstance(w, LocalWorker):
                raise TypeError(f"LocalLauncher.wait got {w!r}, not a LocalWorker")
            by_object[w.connection] = by_object[w.sentinel] = w
        ready: list[WorkerHandle] = []
        for obj in wait(list(by_object), max(timeout, 0)):
            if not any(h is by_object[obj] for h in ready):
                ready.append(by_object[obj])
        return ready

    def shutdown(self, timeout: float) -> None:
        """Nothing to release: the group reaps the processes it was handed."""
