"""How a ``"distributed"`` link streams a message in pieces.

A gloo message packed first and sent after costs a pack plus a send, one after the
other. A streaming end instead lets its link signal the collector *before* the pack,
so the collector's receives are posted when the first bytes leave, and sends each
piece from a thread of its own as soon as it is packed; the header (version,
checksum) goes last, once the whole payload is known. Both ends cut a message of
``n`` bytes into the same pieces (:func:`pieces`), so each send meets a receive of
its size.
"""

from __future__ import annotations

from weight_sync.transports.base import LinkSpec
from weight_sync.wire.layout import HEADER_BYTES

__all__ = ["STREAM_PIECE", "STREAM_NOTE", "streams", "pieces"]

STREAM_PIECE = 4 << 20
"""Payload bytes per piece. 1, 4 and 8 MB measured the same here; smaller pieces
let the first bytes leave sooner, larger ones cost fewer sends."""

STREAM_NOTE = "pieces"
"""The note of a streamed message's signal: the collector receives it in pieces."""


def streams(spec: LinkSpec) -> bool:
    """True if a link streams its messages: gloo (CPU buffers, packed by the calling
    thread in order), and a message of at least two pieces (below that, the extra
    sends and the thread hand-off cost more than the overlap saves)."""
    return spec.backend == "gloo" and spec.layout.nbytes >= HEADER_BYTES + 2 * STREAM_PIECE


def pieces(nbytes: int) -> list[tuple[int, int]]:
    """The ``(start, end)`` byte spans a message of ``nbytes`` travels in, in order:
    the payload in :data:`STREAM_PIECE` pieces, then the header."""
    spans = [(start, min(start + STREAM_PIECE, nbytes))
             for start in range(HEADER_BYTES, nbytes, STREAM_PIECE)]
    spans.append((0, HEADER_BYTES))
    return spans
