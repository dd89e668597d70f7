"""A collector's end of the ``"distributed"`` transport: a receive on a pair group."""

from __future__ import annotations

import time
from datetime import timedelta

import torch
import torch.distributed as dist

from weight_sync.control import LinkChannel
from weight_sync.errors import PeerGone, ProtocolError
from weight_sync.transports.base import LinkSpec
from weight_sync.transports.pair import COLLECTOR_RANK, PairGroup

__all__ = ["DistributedReceiver"]


class DistributedReceiver:
    """Receives each message with one point-to-point ``recv`` on the link's own group."""

    def __init__(self, spec: LinkSpec) -> None:
        self.spec = spec
        self._pair = PairGroup(spec, COLLECTOR_RANK)

    def connect(self, channel: LinkChannel, timeout: float) -> None:
        self._pair.connect(channel, timeout)

    def receive(self, note: str, buffer: torch.Tensor | None,
                timeout: float) -> torch.Tensor:
        group = self._pair.group
        if group is None or buffer is None:
            raise ProtocolError(f"{self.spec.who()}: receive on a link that is not connected")
        start = time.monotonic()
        try:
            group.recv([buffer], self._pair.peer, 0).wait(timedelta(seconds=timeout))
        except (dist.DistError, RuntimeError) as exc:
            raise PeerGone(f"{self.spec.who()}: transfer failed after "
                           f"{time.monotonic() - start:.2f}s (learner gone?): {exc}") from exc
        return buffer

    def close(self) -> None:
        self._pair.close()
