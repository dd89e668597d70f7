"""The learner's publish path: :class:`Publisher` packs each version once and hands it
to every collector's link, keeps the newest for collectors that join later, and times
each round for :class:`~weight_sync.metrics.SyncStats`."""

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
        """The newest published version, kept so a collector that (re)joins gets it."""
        self._sent: dict[int, tuple[float, float]] = {}  # version -> (start, pack seconds)

    def publish(self, sources: list[torch.Tensor], version: int,
                links: Mapping[int, SenderLink]) -> None:
        """Pack ``sources`` as ``version`` and hand it to every link. A sole collector's
        idle link whose transport streams gets it first, so it signals it and sends
        each piece while the rest is packed. If the pack fails, the exception
        propagates and nothing of ``version`` is applied anywhere (a link streaming it
        sends it marked abandoned)."""
        start = time.perf_counter()
        # Collectors that use the snapshot in place do not check a checksum: stamp one
        # only if a link receives a copy (one joining later gets it then).
        copies = not links or any(not link.lends for link in links.values())
        snap = self.pool.reserve(version, checksum=copies)
        early: list[SenderLink] = []
        try:
            if len(links) <= _STREAM_TO_AT_MOST:
                early = [link for link in links.values() if link.takes_unpacked]
            for link in early:
                link.send_weights_async(snap)
            self.pool.fill(snap, sources)
        except BaseException:
            snap.release()
            raise
        if self.latest is not None:
            self.latest.release()
        self.latest = snap
        for link in links.values():
            if link not in early:  # a broken link is reported and retired by wait_ack
                link.send_weights_async(snap)
        self._sent[version] = (start, time.perf_counter() - start)

    def catch_up(self, link: SenderLink) -> None:
        """Send a link that just joined the newest version, if one was published."""
        if self.latest is None:
            return
        if not link.lends:
            self.pool.stamp_checksum(self.latest)
        link.send_weights_async(self.latest)

    def record(self, version: int, nbytes: int, collectors: int) -> None:
        """``version`` was acknowledged by all ``collectors``: record its round (once)."""
        sent = self._sent.pop(version, None)
        for v in [v for v in self._sent if v < version]:
            del self._sent[v]
        if sent is not None:
            started, pack_s = sent
            self.stats.add(SyncRecord(version, nbytes, collectors, pack_s,
                                      time.perf_counter() - started))

    def close(self) -> None:
        """Release the newest snapshot and close the pool (its shared memory)."""
        if self.latest is not None:
            self.latest.release()
            self.latest = None
        self.pool.close()
