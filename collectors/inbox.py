"""The learner's end of the collectors' channels: messages in, typed failures out.

:class:`Inbox` waits on every collector at once through its launcher's ``wait`` (for
local processes: their pipes *and* process sentinels in one
``multiprocessing.connection.wait`` call; for Ray actors: one ``ray.wait``), decodes what
arrived (see :mod:`weight_sync.collectors.batch_messages`) and turns a collector's error report or
the end
of its channel into a :class:`~weight_sync.collectors.errors.CollectorError` naming it. A handle
gives every message before it tells of its end, so a collector's traceback wins over its
exit code.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from tensordict import TensorDictBase
from weight_sync.collectors.batch_messages import decode_message
from weight_sync.collectors.errors import CollectorCrashed, CollectorDied, CollectorError
from weight_sync.collectors.launcher import WorkerHandle

__all__ = ["Inbox"]

log = logging.getLogger(__name__)


class Inbox:
    """Collects the messages of ``workers`` (a list the owner may still extend).

    Args:
        workers: the handles, indexed by collector id; the owner may replace one (a
            restarted collector), and messages of the replaced handle are then dropped.
        wait: the launcher's :meth:`~weight_sync.collectors.launcher.Launcher.wait` for these
            handles.
        recover: called with each failure; returning True means the owner dealt with
            it (e.g. restarted that collector), so it is neither recorded nor raised.

    Attributes:
        ready: received batches, oldest first, as ``(header, batch, handle)``.
        said_hello: ids of the collectors that built their env and policy.
        ended: ids whose channel closed or whose process ended.
        failure: the first failure seen; raised again by every later :meth:`pump`.
    """

    def __init__(self, workers: list[WorkerHandle],
                 wait: Callable[[Sequence[WorkerHandle], float], list[WorkerHandle]],
                 recover: Callable[[CollectorError], bool] | None = None) -> None:
        self.workers = workers
        self._wait = wait
        self.recover = recover
        self.ready: deque[tuple[dict[str, Any], TensorDictBase, WorkerHandle]] = deque()
        self.said_hello: set[int] = set()
        self.ended: set[int] = set()
        self.failure: CollectorError | None = None

    def fail(self, error: CollectorError) -> CollectorError:
        """Record ``error`` as the failure unless one is recorded already; return it."""
        if self.failure is None:
            self.failure = error
            log.error("%s", error)
        return self.failure

    def pump(self, timeout: float) -> None:
        """Wait up to ``timeout`` s for messages or collector ends and handle all of them.

        Raises:
            CollectorCrashed: a collector reported an exception.
            CollectorDied: a collector's channel closed or its process ended.
        """
        if self.failure is not None:
            raise self.failure
        for w in self._wait(self._live(), max(timeout, 0)):
            self._read_all(w)

    def drain_quietly(self, timeout: float) -> None:
        """While closing: read and drop messages so that no collector blocks on its channel."""
        for w in self._wait(self._live(), max(timeout, 0)):
            try:
                while w.receive() is not None:
                    pass
            except (EOFError, OSError):
                self.ended.add(w.worker_id)

    def _live(self) -> list[WorkerHandle]:
        return [w for w in self.workers if w.worker_id not in self.ended]

    def _current(self, w: WorkerHandle) -> bool:
        return any(h is w for h in self.workers)

    def _failed(self, error: CollectorError) -> None:
        if self.recover is not None and self.recover(error):
            return
        raise self.fail(error)

    def _read_all(self, w: WorkerHandle) -> None:
        while self._current(w) and w.worker_id not in self.ended:
            try:
                data = w.receive()
            except (EOFError, OSError):
                self._ended_process(w)
                return
            if data is None:
                return
            self._handle(w, data)

    def _handle(self, w: WorkerHandle, data: bytes | bytearray) -> None:
        header, batch = decode_message(data)
        kind = header["kind"]
        if kind == "batch" and batch is not None:
            self.ready.append((header, batch, w))
        elif kind == "hello":
            self.said_hello.add(w.worker_id)
        elif kind == "error":
            self.ended.add(w.worker_id)
            self._failed(CollectorCrashed(
                f"collector {w.worker_id} (pid {w.pid}) raised {header['error']}\n"
                f"--- collector {w.worker_id} traceback ---\n{header['traceback']}",
                w.worker_id, traceback=header["traceback"]))
        elif kind == "stopped":
            log.info("collector %d stopped: %s", w.worker_id, header.get("reason"))

    def _ended_process(self, w: WorkerHandle) -> None:
        """The channel closed or the process ended: while running, that is a failure."""
        if not self._current(w):
            return  # replaced by a restart during this pump
        self.ended.add(w.worker_id)
        w.join(2.0)  # the channel closes just before the process exits: reap its exit code
        self._failed(CollectorDied(
            f"collector {w.worker_id} (pid {w.pid}) ended unexpectedly ({w.end_reason()})",
            w.worker_id, exitcode=w.exitcode))
