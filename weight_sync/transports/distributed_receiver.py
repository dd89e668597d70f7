"""A collector's end of the ``"distributed"`` transport: a receive on a pair group, in
pieces for a streamed message (:mod:`weight_sync.transports.streaming`)."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist

from weight_sync.control import LinkChannel
from weight_sync.errors import PeerGone, ProtocolError
from weight_sync.transports.base import LinkSpec
from weight_sync.transports.pair import COLLECTOR_RANK, PairGroup
from weight_sync.transports.streaming import STREAM_NOTE, pieces, streams

__all__ = ["DistributedReceiver"]


class DistributedReceiver:
    """Receives each message with one point-to-point ``recv`` on the link's own group,
    or a streamed one with a ``recv`` per piece, all posted at once."""

    def __init__(self, spec: LinkSpec) -> None:
        self.spec = spec
        self.streams = streams(spec)
        self._pair = PairGroup(spec, COLLECTOR_RANK)

    def connect(self, channel: LinkChannel, timeout: float) -> None:
        self._pair.connect(channel, timeout)

    def receive(self, note: str, buffer: torch.Tensor | None, timeout: float,
                landed: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """See :class:`~weight_sync.transports.base.StreamingReceiver`."""
        group = self._pair.group
        if group is None or buffer is None:
            raise ProtocolError(f"{self.spec.who()}: receive on a link that is not connected")
        start = time.monotonic()
        spans = pieces(buffer.numel()) if note == STREAM_NOTE else [(0, buffer.numel())]
        try:
            works = [group.recv([buffer[s:e]], self._pair.peer, 0) for s, e in spans]
            for (s, e), work in zip(spans, works, strict=True):
                left = start + timeout - time.monotonic()
                work.wait(timedelta(seconds=max(left, 0.001)))
                if landed is not None:
                    landed(s, e)
        except (dist.DistError, RuntimeError) as exc:
            raise PeerGone(f"{self.spec.who()}: transfer failed after "
                           f"{time.monotonic() - start:.2f}s (learner gone?): {exc}") from exc
        return buffer

    def close(self) -> None:
        self._pair.close()
