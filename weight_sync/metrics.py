"""Per-sync figures a user can read programmatically (``sender.stats``)."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from weight_sync.errors import CollectorFailed, WeightSyncTimeout

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
    placements: tuple[tuple[str, int, float], ...] = ()
    """Per placement (the transport its collectors were placed on): ``(transport,
    collectors, seconds from send_weights_async to the last of their acks)``."""

    @property
    def gbps(self) -> float:
        """Bytes delivered to all collectors per second of the round, in GB/s."""
        return _gbps(self.nbytes * self.num_collectors, self.round_s)


def _gbps(nbytes: float, seconds: float) -> float:
    return nbytes / seconds / 1e9 if seconds else 0.0


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class SyncStats:
    """The recent sync rounds (bounded) with their quantiles."""

    records: deque[SyncRecord] = field(default_factory=lambda: deque(maxlen=10_000))
    messages_sent: int = 0
    """Messages handed to the transports, all collectors together (resends included)."""
    bytes_sent: int = 0
    """Their bytes: a whole message's size each, or a changed-only one's."""
    changed_only_sent: int = 0
    """How many of them were changed-only messages (``SenderConfig.changed_only``)."""

    def add(self, record: SyncRecord) -> None:
        self.records.append(record)

    def count_message(self, nbytes: int, *, changed_only: bool) -> None:
        """One message of ``nbytes`` handed to a transport."""
        self.messages_sent += 1
        self.bytes_sent += nbytes
        self.changed_only_sent += changed_only

    @property
    def last(self) -> SyncRecord | None:
        return self.records[-1] if self.records else None

    def latency(self, q: float) -> float:
        """Quantile ``q`` (0.5 = median) of the round latency in seconds."""
        return _quantile([r.round_s for r in self.records], q)

    def summary(self) -> dict[str, float]:
        """Rounds, p50/p90/p99 latency (s), median GB/s, bytes per whole message, the
        bytes handed to the transports in all, and per placement ``<transport>_...``:
        its collectors, median round and median GB/s (:meth:`by_placement`)."""
        out = {
            "rounds": float(len(self.records)),
            "p50_s": self.latency(0.5),
            "p90_s": self.latency(0.9),
            "p99_s": self.latency(0.99),
            "gbps_median": _quantile([r.gbps for r in self.records], 0.5),
            "nbytes": float(self.records[-1].nbytes) if self.records else 0.0,
            "bytes_sent": float(self.bytes_sent),
        }
        for transport, figures in self.by_placement().items():
            out.update({f"{transport}_{name}": value for name, value in figures.items()})
        return out

    def by_placement(self) -> dict[str, dict[str, float]]:
        """Per placement (the transport collectors were placed on): ``collectors`` (in
        the newest round), ``p50_s`` (median time from ``send_weights_async`` to the
        last of their acks) and ``gbps_median`` (their bytes per second of that)."""
        rounds: dict[str, list[tuple[int, float, int]]] = {}
        for record in self.records:
            for transport, collectors, seconds in record.placements:
                rounds.setdefault(transport, []).append((collectors, seconds, record.nbytes))
        return {transport: {
            "collectors": float(seen[-1][0]),
            "p50_s": _quantile([s for _, s, _ in seen], 0.5),
            "gbps_median": _quantile([_gbps(n * b, s) for n, s, b in seen], 0.5),
        } for transport, seen in sorted(rounds.items())}


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

    @classmethod
    def of(cls, version: int, acked_versions: dict[int, int],
           failed: dict[int, str]) -> AckResult:
        """The outcome for ``version``, from each live collector's newest acked version."""
        return cls(version=version,
                   acked=tuple(sorted(c for c, v in acked_versions.items() if v >= version)),
                   failed=failed,
                   lagging=tuple(sorted(c for c, v in acked_versions.items() if v < version)))

    def raise_if_incomplete(self, waited: float, pids: dict[int, int | None] | None = None,
                            acked_versions: dict[int, int] | None = None) -> None:
        """Raise the typed error of an incomplete wait, carrying this result
        (``acked_versions``, if given, says how far each lagging collector got).

        Raises:
            CollectorFailed: a collector failed (the lowest id named; ``pids`` attached).
            WeightSyncTimeout: collectors still lag after ``waited`` seconds.
        """
        if self.failed:
            first = min(self.failed)
            raise CollectorFailed(
                f"version {self.version}: collector(s) {sorted(self.failed)} failed "
                f"({self.failed[first]}); acked by {list(self.acked)}, lagging "
                f"{list(self.lagging)} after {waited:.2f}s", first, self, pids)
        if self.lagging:
            versions = acked_versions or {}
            detail = ", ".join(f"{c} (acked {versions[c]})" if c in versions else str(c)
                               for c in self.lagging)
            raise WeightSyncTimeout(
                f"version {self.version} not acked after {waited:.2f}s by collector(s) "
                f"{detail}", self)
