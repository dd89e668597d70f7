"""Hooks into a collector's receive path, for fault injection and instrumentation.

Pass them as ``WeightReceiver(..., hooks=ReceiverHooks(...))``. They run in the
receiver's own threads; an exception a hook raises becomes the stream's error, raised
by the next ``receive_weights`` (as any failure of the background receive).

Example (a test that kills the collector half-way through a transfer)::

    hooks = ReceiverHooks(before_receive=lambda version, buffer: start_watching(buffer))
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["ReceiverHooks"]


@dataclass(frozen=True)
class ReceiverHooks:
    """Callbacks on a collector's receive path; each ``None`` by default."""

    before_connect: Callable[[int, int], None] | None = None
    """``(collector_id, incarnation)``: admitted, before the transport's rendezvous."""
    before_receive: Callable[[int, torch.Tensor | None], None] | None = None
    """``(version, buffer)``: the message was signalled, before the transport fills
    ``buffer`` (``None`` for a transport that lends its messages, e.g. ``"shm"``; for a
    changed-only message, the smaller buffer its changed leaves are received into)."""
    during_receive: Callable[[int, int], None] | None = None
    """``(version, bytes so far)``: after each piece of a message, for transports that
    stream it in pieces (``"relay"``); a hook that blocks holds the transfer there."""
    after_receive: Callable[[int, torch.Tensor], None] | None = None
    """``(version, message)``: the transport delivered the message, before its header
    and checksum (or digest) are checked (a changed-only message already composed into
    the whole one, which is what is checked; a hook may corrupt it here to test the
    checks; for a lending transport this is the collector's copy-on-write view, the learner's
    memory stays intact, and a refused message's mapping is refreshed when it is sent
    again)."""
