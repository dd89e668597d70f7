"""A collector's end of the ``"distributed"`` transport: a receive on a pair group, in
pieces for a streamed message (:mod:`weight_sync.transports.streaming`), posted before
the message's signal for a small one."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from weight_sync.control.channel import LinkChannel
from weight_sync.control.store import IN_FLIGHT
from weight_sync.errors import PeerGone, ProtocolError
from weight_sync.transports.base import LinkSpec
from weight_sync.transports.pair import COLLECTOR_RANK, PairGroup
from weight_sync.transports.streaming import STREAM_NOTE, pieces, streams

__all__ = ["DistributedReceiver", "posts_early"]

POST_EARLY_BELOW = 1 << 20
"""Messages under this many bytes are received by a receive posted before their signal
(:meth:`DistributedReceiver.post`): gloo writes a message whose receive is posted at
once, from the learner's sending thread, instead of first waiting for the collector to
post it. Measured here, alternating, 1 collector: a 298-leaf 100K-parameter policy
(0.4 MB) 0.95 -> 0.82 ms a round. Not above: the learner would then write the whole
message inside ``send_weights_async`` (4 MB: 0.65 ms there became 0.7-1.3 ms)."""


def posts_early(spec: LinkSpec) -> bool:
    """True if a link's messages are small enough to be received by a ``recv`` posted
    before their signal (gloo, a whole message under :data:`POST_EARLY_BELOW`)."""
    return (spec.backend == "gloo" and not streams(spec)
            and spec.layout.nbytes < POST_EARLY_BELOW)


class DistributedReceiver:
    """Receives each message with one point-to-point ``recv`` on the link's own group,
    or a streamed one with a ``recv`` per piece, all posted at once; a small whole
    message by a ``recv`` posted before its signal (:meth:`post`, :func:`posts_early`).
    """

    def __init__(self, spec: LinkSpec) -> None:
        self.spec = spec
        self._posts_early = posts_early(spec)
        self._pair = PairGroup(spec, COLLECTOR_RANK)
        self._posted: tuple[torch.Tensor, Any] | None = None  # (buffer, its recv)

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
        posted, self._posted = self._posted, None
        if posted is not None and (posted[0] is not buffer or len(spans) > 1):
            raise ProtocolError(f"{self.spec.who()}: a message (note {note!r}) for another "
                                f"receive than the one posted before its signal")
        try:
            works = ([posted[1]] if posted is not None else
                     [group.recv([buffer[s:e]], self._pair.peer, 0) for s, e in spans])
            for (s, e), work in zip(spans, works, strict=True):
                left = max(start + timeout - time.monotonic(), 0.001)
                with IN_FLIGHT.entered(f"{self.spec.who()}: receiving", left):
                    work.wait(timedelta(seconds=left))
                if landed is not None:
                    landed(s, e)
        except (dist.DistError, RuntimeError) as exc:
            raise PeerGone(f"{self.spec.who()}: transfer failed after "
                           f"{time.monotonic() - start:.2f}s (learner gone?): {exc}") from exc
        return buffer

    def post(self, buffer: torch.Tensor) -> None:
        """See :class:`~weight_sync.transports.base.EarlyReceiver`."""
        group = self._pair.group
        if group is None or not self._posts_early:
            raise ProtocolError(f"{self.spec.who()}: no early receive on this link")
        if self._posted is not None:
            if self._posted[0] is not buffer:
                raise ProtocolError(f"{self.spec.who()}: a receive into another buffer is "
                                    f"already posted")
            return
        try:
            self._posted = (buffer, group.recv([buffer], self._pair.peer, 0))
        except (dist.DistError, RuntimeError) as exc:
            raise PeerGone(f"{self.spec.who()}: could not post a receive (learner "
                           f"gone?): {exc}") from exc

    def close(self) -> None:
        # A receive still posted ends with the group (the learner sends nothing more).
        self._posted = None
        self._pair.close()
