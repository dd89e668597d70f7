"""A pool of reusable message buffers for the learner's snapshots.

``send_weights_async`` copies the weights into a buffer from this pool, so the learner
may step its optimizer while the bytes are in flight. A buffer goes back to the pool
when every transport that sends it is done, so memory stays bounded by the number of
sends in flight, and a steady state allocates nothing.

A snapshot can be handed out before it is packed (:meth:`SnapshotPool.reserve`) to a
transport that streams it: the pack (:meth:`SnapshotPool.fill`) reports its progress,
and :meth:`Snapshot.wait_packed` waits for a span's bytes. A pack that fails half-way
leaves a snapshot whose header says so (:data:`~weight_sync.wire.packing.ABANDONED`): a
collector that received it refuses it, nothing applied.
"""

from __future__ import annotations

import contextlib
import threading
from multiprocessing import shared_memory

import torch

from weight_sync.errors import WeightSyncTimeout
from weight_sync.wire.auth import message_digest
from weight_sync.wire.layout import BufferLayout
from weight_sync.wire.packing import leaf_digests, write_abandoned, write_header
from weight_sync.wire.shm import create_segment
from weight_sync.wire.stamping import Stamper

__all__ = ["Snapshot", "SnapshotPool"]


class Snapshot:
    """One packed version of the weights, shared by the transports that send it."""

    def __init__(self, pool: SnapshotPool, buffer: torch.Tensor) -> None:
        self._pool = pool
        self.buffer = buffer
        self.views = pool.layout.views(buffer)
        self.version = -1
        self.segment: str | None = None
        """Name of the shared-memory segment holding the buffer, if any."""
        self.digest = ""
        """BLAKE3 digest of the message, when the pool computes digests (a shared secret)."""
        self.leaf_digests: tuple[int, ...] = ()
        """Checksum of each leaf, when the pool computes them (changed-only messages)."""
        self.abandoned = False
        """Its pack failed half-way; its header says so (never applied)."""
        self.checksummed = False
        """Its header carries a checksum of its payload."""
        self._packed = 0  # bytes from the start that hold their final value
        self._finished = True  # packed or abandoned: no more waits
        self._refs = 0

    @property
    def packed(self) -> bool:
        """True once its pack ended (whole or abandoned): no :meth:`wait_packed` waits."""
        return self._finished

    def wait_packed(self, upto: int | None, timeout: float) -> None:
        """Block until the payload's bytes before ``upto`` are packed, or (``None``)
        the whole message, header included; also returns once the pack was abandoned.

        Raises:
            WeightSyncTimeout: the pack got no further within ``timeout`` s.
        """
        if self._finished:
            return
        with self._pool.packing:
            if not self._pool.packing.wait_for(
                    lambda: self._finished or (upto is not None and self._packed >= upto),
                    timeout):
                raise WeightSyncTimeout(f"version {self.version}: bytes up to {upto} not "
                                        f"packed after {timeout:.1f}s")

    def _mark(self, packed: int) -> None:
        with self._pool.packing:
            self._packed = packed
            self._pool.packing.notify_all()

    def _finish(self, abandoned: bool) -> None:
        with self._pool.packing:
            self.abandoned = abandoned
            self._finished = True
            self._pool.packing.notify_all()

    def retain(self) -> Snapshot:
        with self._pool.lock:
            self._refs += 1
        return self

    def release(self) -> None:
        """Drop one reference; the last one returns the buffer to the pool (a private
        one to a pool that now shares its buffers is dropped)."""
        with self._pool.lock:
            self._refs -= 1
            if self._refs == 0:
                if self._pool.shared and self.segment is None:
                    self._pool.allocated -= 1
                else:
                    self._pool.free.append(self)
            elif self._refs < 0:
                raise RuntimeError("snapshot released more often than retained")


class SnapshotPool:
    """Hands out packed snapshots of a layout on one device.

    Args:
        shared: allocate the buffers in named shared-memory segments (CPU only), so
            that collectors on this host can read them (``transport="shm"``); a pool
            may also start private and :meth:`share` once such a collector comes.
        checksum: stamp each message's header with a checksum of its payload.
        digests: compute each message's BLAKE3 digest (:attr:`Snapshot.digest`), for signed
            signals.
        leaf_digests: compute each leaf's checksum (:attr:`Snapshot.leaf_digests`), for
            changed-only messages.

    Buffers are zeroed when allocated, so the alignment padding between leaves (never
    written by a pack) is the same bytes in every snapshot: a collector that keeps
    unchanged spans from an older message ends up with the learner's exact bytes.
    """

    def __init__(self, layout: BufferLayout, device: torch.device, shared: bool = False, *,
                 checksum: bool = False, digests: bool = False,
                 leaf_digests: bool = False) -> None:
        self.checksum = checksum
        self.digests = digests
        self.leaf_digests = leaf_digests
        self._stamper = Stamper(layout, checksum)
        self.layout = layout
        self.device = device
        self.shared = shared
        self.lock = threading.Lock()
        self.packing = threading.Condition(self.lock)
        """Notified as a snapshot's pack progresses (:meth:`Snapshot.wait_packed`)."""
        self.free: list[Snapshot] = []
        self.allocated = 0
        self._segments: list[shared_memory.SharedMemory] = []

    def take(self, sources: list[torch.Tensor], version: int) -> Snapshot:
        """Pack ``sources`` as ``version`` into a free buffer; the caller holds one ref."""
        snap = self.reserve(version)
        try:
            self.fill(snap, sources)
        except BaseException:
            snap.release()
            raise
        return snap

    def reserve(self, version: int, *, checksum: bool = True) -> Snapshot:
        """A free buffer for ``version``, not packed yet (fill it with :meth:`fill`);
        the caller holds one ref.

        Args:
            checksum: ``False`` skips the pool's checksum for this snapshot (every
                collector it goes to uses it in place; :meth:`stamp_checksum` adds one
                later if needed).
        """
        with self.lock:
            snap = self.free.pop() if self.free else None
        if snap is None:
            snap = self._allocate(self.shared)
        snap.version, snap.digest, snap.leaf_digests = version, "", ()
        snap.abandoned, snap._packed, snap._finished = False, 0, False
        snap.checksummed = self.checksum and checksum
        return snap.retain()

    def _allocate(self, shared: bool) -> Snapshot:
        """A new buffer (``SharedMemoryFull`` if a shared one finds no room)."""
        segment = None
        if shared:
            segment, buffer = create_segment(self.layout.nbytes)  # zeroed by the kernel
            self._segments.append(segment)
        else:
            buffer = torch.zeros(self.layout.nbytes, dtype=torch.uint8, device=self.device)
        snap = Snapshot(self, buffer)
        snap.segment = None if segment is None else segment.name
        with self.lock:
            self.allocated += 1
        return snap

    @property
    def shared_bytes(self) -> int:
        """Bytes of shared memory this pool's buffers hold."""
        return len(self._segments) * self.layout.nbytes

    def share(self) -> None:
        """Allocate buffers in shared memory from now on (a collector was placed on a
        transport that uses them in place); private buffers are dropped as they come
        back. Copy what must stay with :meth:`shared_copy`."""
        with self.lock:
            if self.shared:
                return
            self.shared = True
            kept = [snap for snap in self.free if snap.segment is not None]
            self.allocated -= len(self.free) - len(kept)
            self.free = kept
        # The stamper keeps views of the buffers it packed into: let the private go.
        old, self._stamper = self._stamper, Stamper(self.layout, self.checksum)
        old.close()

    def shared_copy(self, snap: Snapshot) -> Snapshot:
        """``snap`` (packed) in a shared buffer: itself if it is one, else a copy of its
        bytes and what it says of them (whether or not the pool shares yet); the caller
        holds one ref of the result.

        Raises:
            SharedMemoryFull: no room for the copy.
        """
        if snap.segment is not None:
            return snap.retain()
        with self.lock:
            copy = next((s for s in self.free if s.segment is not None), None)
            if copy is not None:
                self.free.remove(copy)
        if copy is None:
            copy = self._allocate(True)
        copy.buffer.copy_(snap.buffer)
        copy.version, copy.digest, copy.leaf_digests = (snap.version, snap.digest,
                                                         snap.leaf_digests)
        copy.abandoned, copy.checksummed = snap.abandoned, snap.checksummed
        copy._packed, copy._finished = snap._packed, True
        return copy.retain()

    def fill(self, snap: Snapshot, sources: list[torch.Tensor], *,
             streamed: bool = False) -> None:
        """Pack ``sources`` into the reserved ``snap``. If the pack fails (an exception,
        ``KeyboardInterrupt`` included), the snapshot is marked abandoned and the
        exception propagates.

        Args:
            streamed: a transport streams ``snap`` while it is packed (each span is
                marked packed as it is, :meth:`Snapshot.wait_packed`); otherwise the
                pack is one gathered copy, the fastest on a busy host.
        """
        try:
            self._stamper.pack(sources, snap.views, snap.buffer, snap.version,
                               progress=snap._mark if streamed else None,
                               checksum=snap.checksummed)
            snap.digest = message_digest(snap.buffer) if self.digests else ""
            snap.leaf_digests = (leaf_digests(snap.buffer, self.layout) if self.leaf_digests
                                 else ())
        except BaseException:
            write_abandoned(snap.buffer, self.layout, snap.version)
            snap._finish(abandoned=True)
            raise
        snap._finish(abandoned=False)

    def stamp_checksum(self, snap: Snapshot) -> None:
        """Add the pool's checksum to a packed snapshot packed without it, before it
        goes to a collector that receives a copy. Only the header's checksum words
        change: the collectors using it in place never read them."""
        if self.checksum and snap.packed and not snap.abandoned and not snap.checksummed:
            write_header(snap.buffer, self.layout, snap.version, checksum=True)
            snap.checksummed = True

    def close(self) -> None:
        """Unlink the shared-memory segments (the memory goes with the last mapping)
        and stop the hashing thread."""
        self._stamper.close()
        for segment in self._segments:
            with contextlib.suppress(FileNotFoundError):
                segment.unlink()
        self._segments.clear()
