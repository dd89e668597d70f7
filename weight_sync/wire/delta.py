"""Changed-only messages (``SenderConfig.changed_only``): a collector is sent only the
leaves whose bytes differ from the version it holds.

The learner knows which version each collector holds (its last ack) and keeps, per
link, the per-leaf checksums of that version (:attr:`Snapshot.leaf_digests`: computed
once per version, when the snapshot is packed, not per collector). For the next
version it compares them with the new snapshot's and, if some leaves are unchanged,
sends a *delta message*: the new snapshot's 64-byte header, then the changed leaves'
spans back to back (a leaf's span is its bytes and the alignment padding after it, so
every span keeps its 64-byte alignment). The update signal names the held version and
the changed leaves (:class:`DeltaSpec`), so the collector knows the size to receive.

The collector receives the delta into a buffer of its own, then builds the whole new
message in its staging buffer (:func:`compose`): header and changed spans from the
delta, unchanged spans from the message it holds. Only then is the result checked
(header, and the checksum or signed digest of the *whole* message, which the learner
computed on its full snapshot) and applied in one step, exactly as a whole message:
the policy is never half old, half new, and what is applied is verified bit-exact
against the learner's version. A delta against a version the collector does not hold,
or one whose result fails the check, is refused and sent again whole.

Whole messages are sent for the initial sync, after a (re)join, for every resend,
when every leaf changed, and when no version is known to be held. With ``wire_dtype``
the comparison is of the bytes on the wire (the narrowed ones): a float32 leaf that
changed by less than the wire dtype resolves is unchanged, and the collector ends up
with exactly what a whole narrowed message would have given it.

Leaf checksums are XXH3-64 with the ``fast`` extra (CRC-32 without): two different
leaves with the same checksum would be taken as unchanged, and the whole-message
check (on by default) then refuses the result and the version is sent again whole.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from weight_sync.errors import ProtocolError
from weight_sync.wire.layout import HEADER_BYTES, BufferLayout
from weight_sync.wire.snapshots import Snapshot

__all__ = ["DeltaSpec", "DeltaMessage", "DeltaEncoder", "spans", "compose"]


def spans(layout: BufferLayout) -> list[tuple[int, int]]:
    """Each leaf's ``(start, end)`` in a message, its trailing padding included: the
    spans and the header tile the whole message."""
    starts = [e.offset for e in layout.entries]
    return list(zip(starts, [*starts[1:], layout.nbytes], strict=True))


@dataclass(frozen=True)
class DeltaSpec:
    """What a delta message holds: the changed leaves (indices into the layout, in
    order) against version ``base``, the one the collector holds.

    Spelled ``<base>:<hex bitmask of the changed leaves>`` in the update signal.
    """

    base: int
    changed: tuple[int, ...]

    def encode(self) -> str:
        mask = 0
        for i in self.changed:
            mask |= 1 << i
        return f"{self.base}:{mask:x}"

    @classmethod
    def decode(cls, text: str, num_leaves: int) -> DeltaSpec:
        """Parse :meth:`encode`'s output for a layout of ``num_leaves`` leaves.

        Raises:
            ProtocolError: malformed, or naming a leaf the layout does not have.
        """
        base, _, mask_hex = text.partition(":")
        try:
            mask, version = int(mask_hex, 16), int(base)
        except ValueError:
            raise ProtocolError(f"malformed changed-only spec {text[:80]!r}") from None
        if mask < 0 or mask >> num_leaves:
            raise ProtocolError(f"changed-only spec {text[:80]!r} names leaves beyond the "
                                f"layout's {num_leaves}")
        return cls(version, tuple(i for i in range(num_leaves) if mask >> i & 1))

    def nbytes(self, layout: BufferLayout) -> int:
        """Size of the delta message: the header and the changed spans."""
        tiles = spans(layout)
        return HEADER_BYTES + sum(tiles[i][1] - tiles[i][0] for i in self.changed)


class DeltaMessage(Snapshot):
    """A delta message, handed to a transport in place of the snapshot it was cut from
    (same version and digest; ``buffer`` holds only the header and the changed spans).
    It is not pooled: the link that made it owns its buffer, and the snapshot stays
    referenced by the link for as long as the message is in flight."""

    def __init__(self, snapshot: Snapshot, buffer: torch.Tensor) -> None:
        # Deliberately not Snapshot.__init__: no pool, no per-leaf views.
        self.buffer = buffer
        self.views = []
        self.version = snapshot.version
        self.segment = None
        self.digest = snapshot.digest
        self.leaf_digests = snapshot.leaf_digests
        self.abandoned = False
        self._finished = True  # cut from a packed snapshot: wait_packed never waits

    def retain(self) -> DeltaMessage:
        return self

    def release(self) -> None:
        return None


class DeltaEncoder:
    """The learner's side of changed-only messages on one link.

    Remembers the leaf checksums of the version the collector acked (:meth:`held`) and
    cuts each next snapshot down to what changed since (:meth:`encode`). Its one buffer
    is reused: a link has one message in flight, and the next is cut only once the
    previous transfer finished.
    """

    def __init__(self, layout: BufferLayout) -> None:
        self.layout = layout
        self._spans = spans(layout)
        self._held: tuple[int, tuple[int, ...]] | None = None  # (version, leaf digests)
        self._buffer: torch.Tensor | None = None

    def held(self, snapshot: Snapshot) -> None:
        """The collector acked ``snapshot``'s version: it now holds exactly it."""
        self._held = (snapshot.version, snapshot.leaf_digests)

    def forget(self) -> None:
        """What the collector holds is unknown (it refused a message): send it whole."""
        self._held = None

    def encode(self, snapshot: Snapshot) -> tuple[Snapshot, DeltaSpec | None]:
        """The message to send for ``snapshot``: a :class:`DeltaMessage` and its spec,
        or the snapshot itself (``None``) when no version is held or every leaf changed."""
        if self._held is None:
            return snapshot, None
        base, digests = self._held
        changed = tuple(i for i, (old, new) in enumerate(
            zip(digests, snapshot.leaf_digests, strict=True)) if old != new)
        if len(changed) == len(self._spans):
            return snapshot, None
        spec = DeltaSpec(base, changed)
        if self._buffer is None:
            self._buffer = torch.empty(self.layout.nbytes, dtype=torch.uint8,
                                       device=snapshot.buffer.device)
        out = self._buffer[:spec.nbytes(self.layout)]
        sources, destinations = [snapshot.buffer[:HEADER_BYTES]], [out[:HEADER_BYTES]]
        pos = HEADER_BYTES
        for i in changed:
            start, end = self._spans[i]
            sources.append(snapshot.buffer[start:end])
            destinations.append(out[pos:pos + end - start])
            pos += end - start
        torch._foreach_copy_(destinations, sources)
        return DeltaMessage(snapshot, out), spec


@torch.no_grad()
def compose(delta: torch.Tensor, spec: DeltaSpec, held: torch.Tensor, out: torch.Tensor,
            layout: BufferLayout) -> None:
    """Build the whole message ``delta`` stands for into ``out``: the header and the
    changed spans from ``delta``, the others from ``held`` (the message of version
    ``spec.base``). ``out`` may be ``held`` itself (then only the changed spans move)."""
    tiles = spans(layout)
    changed = set(spec.changed)
    sources, destinations = [delta[:HEADER_BYTES]], [out[:HEADER_BYTES]]
    pos = HEADER_BYTES
    in_place = out.data_ptr() == held.data_ptr()
    for i, (start, end) in enumerate(tiles):
        if i in changed:
            sources.append(delta[pos:pos + end - start])
            pos += end - start
        elif in_place:
            continue
        else:
            sources.append(held[start:end])
        destinations.append(out[start:end])
    torch._foreach_copy_(destinations, sources)
