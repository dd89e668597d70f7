"""How the learner waits for acks: per placement (transport), the ones that usually come
first, first, so that each placement's round is timed when its last ack is seen
(:class:`~weight_sync.metrics.SyncStats`); and the :class:`AckResult` a wait ends with."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from weight_sync.control.channel import Control
from weight_sync.errors import ClosedError, ConnectionFailed
from weight_sync.learner.publisher import Publisher
from weight_sync.learner.sender_link import SenderLink
from weight_sync.metrics import AckResult

__all__ = ["ack_result", "wait_placements"]

# The placements' acks are waited for in this order: a placement's round is when the
# last of its acks is seen.
_FAST_FIRST = ("shm", "distributed", "relay")

Awaited = dict[int, tuple[str, tuple[int, int, int]]]
"""Per collector id: its link's transport and the ``(id, incarnation, version)`` ack
awaited."""


def _order(transport: str) -> tuple[bool, int, str]:
    fast = transport in _FAST_FIRST
    return (not fast, _FAST_FIRST.index(transport) if fast else 0, transport)


def wait_placements(control: Control, waiting: Awaited, timeout: float, target: int,
                    closed: Callable[[], bool]) -> dict[int, float]:
    """Wait up to ``timeout`` on ``control`` (the calling thread's own store client) for
    the acks ``waiting`` names, one placement after the other, best first, at a store
    round trip per placement. Returns when each collector's ack was seen
    (``time.perf_counter()``).

    Raises:
        WeightSyncTimeout: not all of them came in time.
        ClosedError: ``closed()`` became true meanwhile (the store stopped under the
            wait).
    """
    groups: dict[str, dict[int, tuple[int, int, int]]] = {}
    for cid, (transport, key) in waiting.items():
        groups.setdefault(transport, {})[cid] = key
    deadline = time.monotonic() + timeout
    seen: dict[int, float] = {}
    for transport in sorted(groups, key=_order):
        try:
            control.wait_acks(groups[transport].values(),
                              max(deadline - time.monotonic(), 0.001),
                              f"acks of version {target}")
        except ConnectionFailed as exc:
            if closed():
                raise ClosedError("WeightSender.wait_ack(): closed meanwhile") from exc
            raise
        now = time.perf_counter()
        seen.update(dict.fromkeys(groups[transport], now))
    return seen


def ack_result(links: Mapping[int, SenderLink], publisher: Publisher, target: int,
               nbytes: int, start: float, newly_failed: dict[int, str],
               failed_pids: dict[int, int | None], ack_seen: dict[int, float]) -> AckResult:
    """The result of a wait for version ``target`` that began at ``start``
    (``time.monotonic()``); records the round (per placement) in the publisher's stats.

    Raises:
        CollectorFailed, WeightSyncTimeout: as :meth:`AckResult.raise_if_incomplete`.
    """
    acked_versions = {c: link.acked_version for c, link in links.items()}
    behind = {c for c, v in acked_versions.items() if v < publisher.current(c)}
    result = AckResult(target, tuple(sorted(acked_versions.keys() - behind)),
                       newly_failed, tuple(sorted(behind)))
    result.raise_if_incomplete(time.monotonic() - start, failed_pids, acked_versions)
    now = time.perf_counter()
    acks: dict[str, list[float]] = {}
    for cid, link in links.items():
        acks.setdefault(link.transport, []).append(ack_seen.get(cid, now))
    publisher.record(target, nbytes, len(links), acks)
    return result
