"""Starting collector processes: a small :class:`Launcher` protocol and local processes.

The :class:`~collectors.group.CollectorGroup` asks its launcher for one
:class:`WorkerHandle` per :class:`~collectors.worker.WorkerSpec` and from then on talks to
the handle only: read its batches from :attr:`WorkerHandle.connection`, notice its end
through :attr:`WorkerHandle.sentinel`, give back credits, ask it to stop, and
terminate it if it does not. :class:`LocalLauncher` (the default) starts
``multiprocessing`` processes with the ``spawn`` method.

Other launchers fit behind the same protocol: a torchrun-style launcher would start
``collectors.worker.run_worker`` from a script reading ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``-like
environment variables and hand back a handle over a socket connection; a Ray launcher
would wrap an actor (its ``ObjectRef`` of the run loop as the sentinel). Only local
processes are implemented here.
"""

from __future__ import annotations

import multiprocessing as mp
from multiprocessing.connection import Connection
from typing import Any, Protocol, runtime_checkable

from collectors.worker import WorkerSpec, process_main

__all__ = ["Launcher", "LocalLauncher", "LocalWorker", "WorkerHandle"]


@runtime_checkable
class WorkerHandle(Protocol):
    """The learner's handle on one running collector."""

    worker_id: int

    @property
    def pid(self) -> int | None: ...

    @property
    def exitcode(self) -> int | None:
        """``None`` while running; negative: killed by that signal."""

    @property
    def sentinel(self) -> int:
        """Waitable with ``multiprocessing.connection.wait``; ready once the worker ended."""

    @property
    def connection(self) -> Connection:
        """Read end of the worker's messages (see :mod:`collectors.transport`)."""

    def is_alive(self) -> bool: ...

    def release_credit(self) -> None:
        """Allow the worker one more batch in flight."""

    def request_stop(self) -> None:
        """Ask the worker to stop after its current step."""

    def join(self, timeout: float) -> None: ...

    def terminate(self) -> None: ...

    def kill(self) -> None: ...


class Launcher(Protocol):
    """Starts collectors; see :class:`LocalLauncher`."""

    def launch(self, spec: WorkerSpec, max_inflight: int) -> WorkerHandle:
        """Start the collector of ``spec`` allowing ``max_inflight`` untaken batches."""
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
        return int(self._process.sentinel)

    @property
    def connection(self) -> Connection:
        return self._connection

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
