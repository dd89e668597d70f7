"""The learner's end of the collectors' pipes: messages in, typed failures out.

:class:`Inbox` waits on every collector's pipe *and* process sentinel in one
``multiprocessing.connection.wait`` call, decodes what arrived (see
:mod:`collectors.transport`) and turns a collector's error report, a closed pipe or an
ended process into a :class:`~collectors.errors.CollectorError` naming it. Messages are
handled before process ends, so a collector's traceback wins over its exit code.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from typing import Any

from tensordict import TensorDictBase

from collectors.errors import CollectorCrashed, CollectorDied, CollectorError, describe_exitcode
from collectors.launcher import WorkerHandle
from collectors.transport import decode_message

__all__ = ["Inbox"]

log = logging.getLogger(__name__)


class Inbox:
    """Collects the messages of ``workers`` (a list the owner may still extend).

    Args:
        workers: the handles, indexed by collector id; the owner may replace one (a
            restarted collector), and messages of the replaced handle are then dropped.
        recover: called with each failure; returning True means the owner dealt with
            it (e.g. restarted that collector), so it is neither recorded nor raised.

    Attributes:
        ready: received batches, oldest first, as ``(header, batch, handle)``.
        said_hello: ids of the collectors that built their env and policy.
        ended: ids whose pipe closed or whose process ended.
        failure: the first failure seen; raised again by every later :meth:`pump`.
    """

    def __init__(self, workers: list[WorkerHandle],
                 recover: Callable[[CollectorError], bool] | None = None) -> None:
        self.workers = workers
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
        """Wait up to ``timeout`` s for messages or process ends and handle all of them.

        Raises:
            CollectorCrashed: a collector reported an exception.
            CollectorDied: a collector's pipe closed or its process ended.
        """
        if self.failure is not None:
            raise self.failure
        live = [w for w in self.workers if w.worker_id not in self.ended]
        by_conn = {id(w.connection): w for w in live}
        by_sentinel = {w.sentinel: w for w in live}
        ready = wait([*(w.connection for w in live), *by_sentinel], max(timeout, 0))
        for obj in sorted(ready, key=lambda o: isinstance(o, int)):  # messages first
            if isinstance(obj, int):
                self._read_all(by_sentinel[obj])
                self._ended_process(by_sentinel[obj])
            else:
                self._read_all(by_conn[id(obj)])

    def drain_quietly(self, timeout: float) -> None:
        """While closing: read and drop messages so that no collector blocks on its pipe."""
        conns = [w.connection for w in self.workers if w.worker_id not in self.ended]
        for conn in wait([*conns, *(w.sentinel for w in self.workers if w.is_alive())],
                         timeout):
            if isinstance(conn, Connection):
                try:
                    conn.recv_bytes()
                except (EOFError, OSError):
                    self.ended.update(w.worker_id for w in self.workers
                                      if w.connection is conn)

    def _current(self, w: WorkerHandle) -> bool:
        return any(h is w for h in self.workers)

    def _failed(self, error: CollectorError) -> None:
        if self.recover is not None and self.recover(error):
            return
        raise self.fail(error)

    def _read_all(self, w: WorkerHandle) -> None:
        if not self._current(w):
            return  # replaced by a restart during this pump
        conn = w.connection
        while self._current(w) and w.worker_id not in self.ended and conn.poll(0):
            try:
                data = conn.recv_bytes()
            except (EOFError, OSError):
                self._ended_process(w)
                return
            self._handle(w, data)

    def _handle(self, w: WorkerHandle, data: bytes) -> None:
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
        """The pipe closed or the process ended: while running, that is a failure."""
        if not self._current(w):
            return  # replaced by a restart during this pump
        self.ended.add(w.worker_id)
        w.join(2.0)  # the pipe closes just before the process exits: reap its exit code
        self._failed(CollectorDied(
            f"collector {w.worker_id} (pid {w.pid}) ended unexpectedly "
            f"({describe_exitcode(w.exitcode)})", w.worker_id, exitcode=w.exitcode))
