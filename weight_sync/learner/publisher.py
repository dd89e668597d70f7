"""The learner's publish path: :class:`Publisher` packs each version once and hands it
to every collector's link (or to some of them), keeps what each collector should hold
for collectors that join later, and times each round for
:class:`~weight_sync.metrics.SyncStats`.

Versions sent to some collectors only: version numbers are the learner's one counter,
so each number names one set of weights. Each collector id has a *current* version:
the newest version sent to all collectors, or a newer one sent to it alone (or to a
subset it is in). A collector is only ever sent its current version; one that
(re)joins is caught up with its own current version, never with a version meant for
others. Memory: a version sent to a subset is kept for those ids until a version sent
to all replaces it (at most one extra snapshot per collector id)."""

from __future__ import annotations

import time
from collections.abc import Mapping

import torch

from weight_sync.learner.sender_link import SenderLink
from weight_sync.metrics import SyncRecord, SyncStats
from weight_sync.wire.snapshots import Snapshot, SnapshotPool

__all__ = ["Publisher"]

# A snapshot is streamed while it is packed only to a sole collector. On 2 cores, with
# every link streaming, the pack starved behind the sends (10M params: the learner's time
# in send_weights_async 22.5 ms at N=2 and 37.9 ms at N=4, against 8.3 and 9.6 ms) for
# rounds only 10% (N=2) and 0% (N=4) shorter; at N=1 the round is 31 -> 21 ms.
_STREAM_TO_AT_MOST = 1


class Publisher:
    """Packs versions into ``pool`` and sends them over the links it is given.

    Args:
        pool: where snapshots are packed (it is closed with the publisher).
        stats: where each acknowledged round is recorded.
    """

    def __init__(self, pool: SnapshotPool, stats: SyncStats) -> None:
        self.pool = pool
        self.stats = stats
        self.latest: Snapshot | None = None
        """The newest version published to all collectors, kept so a collector that
        (re)joins gets it (unless it has a newer one of its own, :attr:`own`)."""
        self.own: dict[int, Snapshot] = {}
        """Per collector id, a version sent to it (in a subset) after :attr:`latest`."""
        self._sent: dict[int, tuple[float, float]] = {}  # version -> (start, pack seconds)

    def current(self, collector_id: int) -> int:
        """The version collector ``collector_id`` should hold (-1: none yet)."""
        snap = self.own.get(collector_id, self.latest)
        return -1 if snap is None else snap.version

    def publish(self, sources: list[torch.Tensor], version: int,
                links: Mapping[int, SenderLink], to: frozenset[int] | None = None) -> None:
        """Pack ``sources`` as ``version`` and hand it to every link, or (``to``) to
        those collector ids only: it becomes their current version, the others keep
        theirs. A sole collector's idle link whose transport streams gets it first, so
        it signals it and sends each piece while the rest is packed. If the pack fails,
        the exception propagates and nothing of ``version`` is applied anywhere (a link
        streaming it sends it marked abandoned)."""
        if to is not None:
            links = {c: link for c, link in links.items() if c in to}
        start = time.perf_counter()
        # Collectors that use the snapshot in place do not check a checksum: stamp one
        # only if a link receives a copy (one joining later gets it then).
        copies = not links or any(link.verifies for link in links.values())
        snap = self.pool.reserve(version, checksum=copies)
        early: list[SenderLink] = []
        try:
            if len(links) <= _STREAM_TO_AT_MOST:
                early = [link for link in links.values() if link.takes_unpacked]
            for link in early:
                link.send_weights_async(snap)
            self.pool.fill(snap, sources, streamed=bool(early))
        except BaseException:
            snap.release()
            raise
        if to is None:
            for held in [self.latest, *self.own.values()]:
                if held is not None:
                    held.release()
            self.own.clear()
            self.latest = snap
        else:
            for cid in to:
                old = self.own.get(cid)
                self.own[cid] = snap.retain()
                if old is not None:
                    old.release()
            snap.release()  # the ids in `to` hold it now
        for link in links.values():
            if link not in early:  # a broken link is reported and retired by wait_ack
                link.send_weights_async(snap)
        self._sent[version] = (start, time.perf_counter() - start)

    def catch_up(self, link: SenderLink) -> None:
        """Send a link that just joined its collector's current version, if one was
        published."""
        snap = self.own.get(link.collector_id, self.latest)
        if snap is None:
            return
        if link.verifies:
            self.pool.stamp_checksum(snap)
        link.send_weights_async(snap)

    def share(self) -> None:
        """Keep snapshots in shared memory from now on, the ones kept for collectors
        that (re)join included: a collector was placed on a transport that uses them in
        place.

        Raises:
            SharedMemoryFull: no room for a copy (nothing changed).
        """
        if self.pool.shared:
            return
        kept = [snap for snap in [self.latest, *self.own.values()] if snap is not None]
        copies: dict[int, Snapshot] = {}
        try:
            for snap in kept:
                if id(snap) not in copies:
                    copies[id(snap)] = self.pool.shared_copy(snap)
        except BaseException:
            for copy in copies.values():
                copy.release()
            raise
        self.pool.share()
        for snap in kept:  # each holder of a snapshot gets a ref of its copy
            copies[id(snap)].retain()
            snap.release()
        for copy in copies.values():
            copy.release()  # shared_copy's own ref
        if self.latest is not None:
            self.latest = copies[id(self.latest)]
        self.own = {cid: copies[id(snap)] for cid, snap in self.own.items()}

    def record(self, version: int, nbytes: int, collectors: int,
               acks: Mapping[str, list[float]] | None = None) -> None:
        """``version`` was acknowledged by all ``collectors``: record its round (once);
        ``acks``: per placement (transport), when each of its collectors' ack was seen
        (``time.perf_counter()``)."""
        sent = self._sent.pop(version, None)
        for v in [v for v in self._sent if v < version]:
            del self._sent[v]
        if sent is not None:
            started, pack_s = sent
            placements = tuple((transport, len(seen), max(seen) - started)
                               for transport, seen in sorted((acks or {}).items()) if seen)
            self.stats.add(SyncRecord(version, nbytes, collectors, pack_s,
                                      time.perf_counter() - started, placements))

    def close(self) -> None:
        """Release the snapshots kept and close the pool (its shared memory)."""
        for held in [self.latest, *self.own.values()]:
            if held is not None:
                held.release()
        self.latest = None
        self.own.clear()
        self.pool.close()
