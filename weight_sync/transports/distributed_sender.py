"""The learner's end of the ``"distributed"`` transport: a send on a pair group, or
a message streamed in pieces as it is packed (:mod:`weight_sync.transports.streaming`)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from weight_sync.control.channel import LinkChannel
from weight_sync.control.store import IN_FLIGHT
from weight_sync.errors import CollectorFailed, WeightSyncError
from weight_sync.transports.base import LinkSpec
from weight_sync.transports.pair import LEARNER_RANK, PairGroup
from weight_sync.transports.streaming import STREAM_NOTE, pieces, streams
from weight_sync.wire.snapshots import Snapshot

__all__ = ["DistributedSender"]


class _Send:
    """A posted ``send`` (gloo/nccl work)."""

    note = ""

    def __init__(self, spec: LinkSpec, work: Any) -> None:
        self._spec = spec
        self._work = work

    def done(self) -> bool:
        if not self._work.is_completed():
            return False
        self.finish(self._spec.timeout)  # raises if it failed
        return True

    def finish(self, timeout: float) -> None:
        try:
            timeout = max(timeout, 0.001)
            with IN_FLIGHT.entered(f"sending to {self._spec.who()}", timeout):
                self._work.wait(timedelta(seconds=timeout))
        except (dist.DistError, RuntimeError) as exc:
            raise CollectorFailed(f"send to {self._spec.who()} failed: {exc}",
                                  self._spec.collector_id) from exc


class _Stream:
    """A message sent in pieces, each as soon as it is packed, from a thread of its own.

    The collector's receives are usually posted before the pieces leave, and gloo then
    writes a piece in the thread that sends it: the caller's thread stays free to pack.
    The thread is a daemon: a collector frozen mid-transfer holds it until the link's
    timeout, never the learner's exit.
    """

    note = STREAM_NOTE

    def __init__(self, spec: LinkSpec, group: Any, peer: int, snapshot: Snapshot) -> None:
        self._spec = spec
        self._future: Future[None] = Future()
        threading.Thread(target=self._run, args=(group, peer, snapshot), daemon=True,
                         name=f"weight-sync-stream-{spec.collector_id}").start()

    def _run(self, group: Any, peer: int, snapshot: Snapshot) -> None:
        deadline = time.monotonic() + self._spec.timeout
        buffer = snapshot.buffer
        try:
            works = []
            for start, end in pieces(buffer.numel()):
                # The header is stamped last, once the whole payload is packed.
                snapshot.wait_packed(end if start else None,
                                     max(deadline - time.monotonic(), 0.001))
                works.append(group.send([buffer[start:end]], peer, 0))
            for work in works:
                left = max(deadline - time.monotonic(), 0.001)
                with IN_FLIGHT.entered(f"streaming to {self._spec.who()}", left):
                    work.wait(timedelta(seconds=left))
        except (dist.DistError, RuntimeError, WeightSyncError) as exc:
            failed = CollectorFailed(f"send to {self._spec.who()} failed: {exc}",
                                     self._spec.collector_id)
            failed.__cause__ = exc
            self._future.set_exception(failed)
        else:
            self._future.set_result(None)

    def done(self) -> bool:
        if not self._future.done():
            return False
        self._future.result()  # raises if it failed
        return True

    def finish(self, timeout: float) -> None:
        try:
            self._future.result(max(timeout, 0.001))
        except FutureTimeout as exc:
            raise CollectorFailed(f"send to {self._spec.who()} not over after {timeout}s",
                                  self._spec.collector_id) from exc


class DistributedSender:
    """Sends each message with one point-to-point ``send`` on the link's own group, or,
    on a link that :func:`~weight_sync.transports.streaming.streams` given a snapshot
    still being packed, in pieces as it is packed (:meth:`Snapshot.wait_packed`).
    """

    def __init__(self, spec: LinkSpec) -> None:
        self.spec = spec
        self._streams = streams(spec)
        self._pair = PairGroup(spec, LEARNER_RANK)

    def connect(self, channel: LinkChannel, timeout: float) -> None:
        self._pair.connect(channel, timeout)

    def send(self, snapshot: Snapshot) -> _Send | _Stream:
        group = self._pair.group
        if group is None:
            raise CollectorFailed(f"send to {self.spec.who()} on a link that is not "
                                  f"connected", self.spec.collector_id)
        if self._streams and not snapshot.packed:
            return _Stream(self.spec, group, self._pair.peer, snapshot)
        try:
            work = group.send([snapshot.buffer], self._pair.peer, 0)
        except (dist.DistError, RuntimeError) as exc:
            raise CollectorFailed(f"send to {self.spec.who()} failed: {exc}",
                                  self.spec.collector_id) from exc
        return _Send(self.spec, work)

    def close(self) -> None:
        self._pair.close()
