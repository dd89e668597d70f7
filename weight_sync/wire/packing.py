"""Packing weights into one flat message, and applying a received message.

The message is a ``uint8`` tensor laid out by :class:`~weight_sync.wire.layout.BufferLayout`:
a 64-byte header (magic, version, size, layout digest, and optionally a checksum of
the payload) then every leaf, aligned. One message per update is what makes the
transfer fast: the per-tensor cost that dominates torchrl's transport disappears.

The checksum is of the payload (everything after the header): XXH3-64 with the
``fast`` extra (about 0.04 ms per MB on this project's machines), CRC-32 from the
standard library without it (about 0.5 ms per MB; :mod:`weight_sync.wire.hashing`). It
catches corruption and truncation, not an adversary: with a shared secret, messages are
authenticated instead (:mod:`weight_sync.wire.auth`).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import torch

from weight_sync.errors import IntegrityError, InvalidWeightsError, ProtocolError
from weight_sync.wire import hashing
from weight_sync.wire.layout import HEADER_BYTES, BufferLayout

__all__ = ["MAGIC", "ABANDONED", "write_header", "write_abandoned", "read_header",
           "header_checksum", "check_payload", "host_bytes", "pack", "swap_in", "copy_in",
           "layout_tag", "leaf_digests"]

MAGIC = 0x5753594E43  # "WSYNC"
_HEADER_WORDS = HEADER_BYTES // 8
# Header word 4 says which checksum word 5 holds (weight_sync.wire.hashing's kinds).

ABANDONED = -1
"""Header word 4 of a message whose pack failed half-way (:func:`write_abandoned`)."""


def host_bytes(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous ``uint8`` tensor, for hashing (a device tensor is
    copied to the host first)."""
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    return tensor.numpy().data


def leaf_digests(buffer: torch.Tensor, layout: BufferLayout) -> tuple[int, ...]:
    """The checksum of each leaf's bytes in a packed message, in layout order (what
    changed-only messages compare, :mod:`weight_sync.wire.delta`)."""
    kind = hashing.checksum_kind()
    return tuple(hashing.checksum(host_bytes(buffer[e.offset:e.offset + e.nbytes]), kind)
                 for e in layout.entries)


def layout_tag(layout: BufferLayout) -> int:
    """The layout digest as a signed 63-bit integer, for the header."""
    return int(layout.digest, 16) & 0x7FFF_FFFF_FFFF_FFFF


# The header through the struct module on the CPU: a handful of torch ops on 8 words
# cost ~0.2 ms a message, more than packing a small policy.
_HEADER = struct.Struct(f"={_HEADER_WORDS}q")


def _put_header(buffer: torch.Tensor, words: tuple[int, ...]) -> None:
    if buffer.device.type == "cpu":
        _HEADER.pack_into(buffer[:HEADER_BYTES].numpy().data, 0, *words)
    else:
        buffer[:HEADER_BYTES].view(torch.int64).copy_(torch.tensor(words, dtype=torch.int64))


def _get_header(buffer: torch.Tensor) -> tuple[int, ...]:
    if buffer.device.type == "cpu":
        return _HEADER.unpack_from(buffer[:HEADER_BYTES].numpy().data)
    return tuple(buffer[:HEADER_BYTES].view(torch.int64).tolist())


def _header_words(layout: BufferLayout, version: int, kind: int = hashing.NO_CHECKSUM,
                  value: int = 0) -> tuple[int, ...]:
    head = (MAGIC, version, layout.nbytes, layout_tag(layout), kind, value)
    return head + (0,) * (_HEADER_WORDS - len(head))


def write_header(buffer: torch.Tensor, layout: BufferLayout, version: int, *,
                 checksum: bool = False, computed: hashing.Checksum | None = None) -> None:
    """Stamp ``version`` (and magic, size, layout tag) into the message header, and a
    checksum of the payload if ``checksum`` (call it once the payload is packed):
    ``computed``, when the caller already hashed the whole payload, else computed here."""
    if not checksum:
        _put_header(buffer, _header_words(layout, version))
        return
    if computed is None:
        computed = hashing.Checksum(hashing.checksum_kind())
        computed.update(host_bytes(buffer[HEADER_BYTES:]))
    _put_header(buffer, _header_words(layout, version, computed.kind, computed.value()))


def write_abandoned(buffer: torch.Tensor, layout: BufferLayout, version: int) -> None:
    """Stamp the header of a message whose pack failed half-way: a collector that
    receives it refuses it (:func:`check_payload` raises), checksum on or off."""
    _put_header(buffer, _header_words(layout, version, ABANDONED))


def header_checksum(buffer: torch.Tensor) -> tuple[int, int]:
    """The (kind, value) of the checksum a message's header carries (kind
    ``NO_CHECKSUM``: none)."""
    kind, value = _get_header(buffer)[4:6]
    return kind, value


def read_header(buffer: torch.Tensor, layout: BufferLayout) -> int:
    """Check a received message's header and return its version.

    Raises:
        ProtocolError: the header is not ours, or was written for another layout.
    """
    magic, version, nbytes, tag = _get_header(buffer)[:4]
    if magic != MAGIC or nbytes != layout.nbytes or tag != layout_tag(layout):
        raise ProtocolError(
            f"received a message that is not a weight-sync message for this layout "
            f"(magic={magic:#x}, nbytes={nbytes}, tag={tag:#x}; expected nbytes="
            f"{layout.nbytes}, tag={layout_tag(layout):#x})"
        )
    return int(version)


def check_payload(buffer: torch.Tensor, who: str, computed: int | None = None) -> None:
    """Verify the payload against the checksum in the header, if it carries one
    (``computed``: the payload's checksum of the header's kind, if the transport
    already hashed it while it arrived).

    Raises:
        IntegrityError: the payload was corrupted or truncated (do not apply it).
        ConfigError: the checksum needs a library this process lacks (named).
    """
    kind, expected = header_checksum(buffer)
    if kind == hashing.NO_CHECKSUM:
        return
    if kind == ABANDONED:
        raise IntegrityError(f"{who}: the learner abandoned this message half-way through "
                             f"packing it")
    if kind not in (hashing.XXH3_64, hashing.CRC32):
        raise IntegrityError(f"{who}: message header names an unknown checksum ({kind})")
    got = computed if computed is not None else hashing.checksum(
        host_bytes(buffer[HEADER_BYTES:]), kind)
    if got != expected:
        raise IntegrityError(f"{who}: message payload checksum {got:#x} does not match its "
                             f"header's {expected:#x} (corrupted or truncated in transit)")


@torch.no_grad()
def pack(sources: Sequence[torch.Tensor], destinations: Sequence[torch.Tensor]) -> None:
    """Copy each source leaf into its view in a message (any strides, any device)."""
    if len(sources) != len(destinations):
        raise InvalidWeightsError(
            f"got {len(sources)} tensors for a layout of {len(destinations)} entries"
        )
    # One fused call instead of hundreds of small copy_ launches.
    torch._foreach_copy_(list(destinations), list(sources))


@torch.no_grad()
def swap_in(targets: Sequence[torch.Tensor], views: Sequence[torch.Tensor]) -> None:
    """Point every target tensor at its view in the message: no copy.

    The tensor objects keep their identity (modules, optimizers and TensorDicts that
    hold them see the new values); only their storage changes. All targets change in
    one pass between two policy calls, so the policy is never half old, half new.
    """
    for target, view in zip(targets, views, strict=True):
        target.data = view


@torch.no_grad()
def copy_in(targets: Sequence[torch.Tensor], views: Sequence[torch.Tensor]) -> None:
    """Copy the message into the targets (used when they live on another device)."""
    torch._foreach_copy_(list(targets), list(views))
