"""The learner's end of the ``"distributed"`` transport: a send on a pair group."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch.distributed as dist

from weight_sync.control import LinkChannel
from weight_sync.errors import CollectorFailed
from weight_sync.snapshots import Snapshot
from weight_sync.transports.base import LinkSpec
from weight_sync.transports.pair import LEARNER_RANK, PairGroup

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
            self._work.wait(timedelta(seconds=max(timeout, 0.001)))
        except (dist.DistError, RuntimeError) as exc:
            raise CollectorFailed(f"send to {self._spec.who()} failed: {exc}",
                                  self._spec.collector_id) from exc


class DistributedSender:
    """Sends each message with one point-to-point ``send`` on the link's own group."""

    def __init__(self, spec: LinkSpec) -> None:
        self.spec = spec
        self._pair = PairGroup(spec, LEARNER_RANK)

    def connect(self, channel: LinkChannel, timeout: float) -> None:
        self._pair.connect(channel, timeout)

    def send(self, snapshot: Snapshot) -> _Send:
        group = self._pair.group
        if group is None:
            raise CollectorFailed(f"send to {self.spec.who()} on a link that is not "
                                  f"connected", self.spec.collector_id)
        try:
            work = group.send([snapshot.buffer], self._pair.peer, 0)
        except (dist.DistError, RuntimeError) as exc:
            raise CollectorFailed(f"send to {self.spec.who()} failed: {exc}",
                                  self.spec.collector_id) from exc
        return _Send(self.spec, work)

    def close(self) -> None:
        self._pair.close()
