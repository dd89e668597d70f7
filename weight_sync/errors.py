"""The typed errors of weight-sync.

Every error is a :class:`WeightSyncError`; catch that to handle any failure of the
library. Messages name the collector, key or version involved and, for waits, the
time waited, so that a log line alone tells what went wrong.
"""

from __future__ import annotations

__all__ = [
    "WeightSyncError",
    "WeightSyncTimeout",
    "ConnectionFailed",
    "PeerGone",
    "LayoutMismatchError",
    "InvalidWeightsError",
    "ProtocolError",
    "DuplicateCollectorError",
    "ClosedError",
    "CollectorFailed",
    "ConfigError",
    "IntegrityError",
    "AuthenticationError",
    "SharedMemoryFull",
]


class WeightSyncError(Exception):
    """Base class of every error raised by weight-sync."""


class WeightSyncTimeout(WeightSyncError, TimeoutError):
    """A bounded wait ran out: the message names what was awaited and for how long.

    Attributes:
        result: for ``wait_ack``, the :class:`~weight_sync.metrics.AckResult` (who
            acked, who failed, who lags); ``None`` elsewhere.
    """

    def __init__(self, message: str, result: object = None) -> None:
        super().__init__(message)
        self.result = result


class ConnectionFailed(WeightSyncError, ConnectionError):
    """The store or a peer could not be reached, or a port could not be bound."""


class PeerGone(ConnectionFailed):
    """The other side (learner or collector) went away while we depended on it."""


class LayoutMismatchError(WeightSyncError, ValueError):
    """The collector's weights do not have the learner's keys, shapes or dtypes.

    Attributes:
        differences: one human-readable line per differing entry.
    """

    def __init__(self, message: str, differences: list[str] | None = None) -> None:
        super().__init__(message)
        self.differences = list(differences or [])


class InvalidWeightsError(WeightSyncError, ValueError):
    """Weights that cannot be synced (empty, sparse, not tensors...)."""


class ProtocolError(WeightSyncError):
    """The peers disagree on the protocol: a wrong version, a torn message, a misuse."""


class IntegrityError(ProtocolError):
    """A message's payload does not match its checksum (corrupted or truncated in
    transit); it was refused, nothing applied."""


class AuthenticationError(WeightSyncError):
    """A peer could not prove it knows the shared secret (a join without it or with a
    wrong one), or a message or signal is not authenticated (forged or replayed).
    Nothing was admitted or applied."""


class DuplicateCollectorError(ProtocolError):
    """A collector id is already served by a live process."""


class ClosedError(WeightSyncError):
    """A call was made on a sender or receiver that is closed."""


class CollectorFailed(WeightSyncError):
    """A collector's transfer failed (it died, or its link broke).

    Attributes:
        collector_id: the (first) failed collector.
        result: for ``wait_ack``, the :class:`~weight_sync.metrics.AckResult`: the other
            collectors' acks were still awaited before this was raised.
        pids: failed collector id -> its process id when it ran on the learner's host
            (``None`` otherwise): tells a dead process from its restarted successor.
    """

    def __init__(self, message: str, collector_id: int, result: object = None,
                 pids: dict[int, int | None] | None = None) -> None:
        super().__init__(message)
        self.collector_id = collector_id
        self.result = result
        self.pids = dict(pids or {})

    @property
    def pid(self) -> int | None:
        """The process id of :attr:`collector_id`, if known."""
        return self.pids.get(self.collector_id)


class ConfigError(WeightSyncError, ValueError):
    """A configuration value is invalid; the message quotes it."""


class SharedMemoryFull(WeightSyncError, MemoryError):
    """``/dev/shm`` has no room for a shared-memory segment: it was refused when it was
    allocated (never a ``SIGBUS`` later), nothing was written to it."""
