"""Per-sync figures a user can read programmatically (``sender.stats``)."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

__all__ = ["AckResult", "SyncRecord", "SyncStats"]


@dataclass(frozen=True)
class SyncRecord:
    """One completed sync round: a version acked by every collector."""

    version: int
    nbytes: int
    num_collectors: int
    pack_s: float
    """Learner time spent snapshotting the weights inside ``send_weights_async``."""
    round_s: float
    """From ``send_weights_async`` to the last collector's ack."""

    @property
    def gbps(self) -> float:
        """Bytes delivered to all collectors per second of the round, in GB/s."""
        return self.nbytes * self.num_collectors / self.round_s / 1e9 if self.round_s else 0.0


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class SyncStats:
    """The recent sync rounds (bounded) with their quantiles."""

    records: deque[SyncRecord] = field(default_factory=lambda: deque(maxlen=10_000))
    pack_s: float = 0.0

    def add(self, record: SyncRecord) -> None:
        self.records.append(record)

    @property
    def last(self) -> SyncRecord | None:
        return self.records[-1] if self.records else None

    def latency(self, q: float) -> float:
        """Quantile ``q`` (0.5 = median) of the round latency in seconds."""
        return _quantile([r.round_s for r in self.records], q)

    def summary(self) -> dict[str, float]:
        """Rounds, p50/p90/p99 latency (s), median GB/s and bytes per message."""
        return {
            "rounds": float(len(self.records)),
            "p50_s": self.latency(0.5),
            "p90_s": self.latency(0.9),
            "p99_s": self.latency(0.99),
            "gbps_median": _quantile([r.gbps for r in self.records], 0.5),
            "nbytes": float(self.records[-1].nbytes) if self.records else 0.0,
        }


@dataclass(frozen=True)
class AckResult:
    """Outcome of one ``wait_ack``: who applied the version, who failed, who lags."""

    version: int
    acked: tuple[int, ...]
    failed: dict[int, str]
    """Collectors whose link broke during this wait (id -> reason); no longer served
    until they join again."""
    lagging: tuple[int, ...]

    @property
    def complete(self) -> bool:
        return not self.failed and not self.lagging
