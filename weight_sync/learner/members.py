"""Who the learner serves: :class:`Members` holds the live collectors' links, the failed
ones until their id rejoins, and admits the joins the door finds."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from weight_sync.config import SenderConfig
from weight_sync.control.channel import Control
from weight_sync.control.store import WILDCARDS
from weight_sync.learner.admission import Admissions, is_local
from weight_sync.learner.placement import Placements
from weight_sync.learner.publisher import Publisher
from weight_sync.learner.sender_link import SenderLink
from weight_sync.transports.base import LinkSpec
from weight_sync.transports.registry import TransportSpec
from weight_sync.wire.auth import StreamKey
from weight_sync.wire.layout import BufferLayout
from weight_sync.wire.protocol import Hello

__all__ = ["Members"]

log = logging.getLogger(__name__)

# A replaced incarnation's keys are deleted again every _SWEEP_S for _FORGET_AGAIN_S:
# its process may have a store write parked behind a cut link (a beat, a goodbye, an
# ack) that TCP delivers after the link is back, later than the id's rejoin (TCP's
# retransmission interval grows to 120 s). In the first _SWEEP_FAST_S, at every round.
_SWEEP_FAST_S = 10.0
_SWEEP_S = 1.0
_FORGET_AGAIN_S = 120.0


class Members:
    """The learner's collectors. Every method runs under the sender's lock.

    Args:
        config: the sender's settings.
        wire_layout: the layout of each message.
        control: the sender's main store client (non-blocking calls only).
        new_control: makes a store client of its own for a thread.
        placements: the transports offered and each link's end.
        publisher: the versions to catch joining collectors up with.
        key: the stream's key, with a secret.
        max_collectors: ids accepted are ``0..max_collectors-1``.
    """

    def __init__(self, config: SenderConfig, wire_layout: BufferLayout, control: Control,
                 new_control: Callable[[], Control], placements: Placements,
                 publisher: Publisher, key: StreamKey | None, max_collectors: int) -> None:
        self._config = config
        self._wire_layout = wire_layout
        self._control = control
        self._placements = placements
        self._publisher = publisher
        self._key = key
        self.links: dict[int, SenderLink] = {}
        """The live collectors' links, by id."""
        self.failed: dict[int, str] = {}
        """Collectors whose link broke (id -> reason), until they join again."""
        self._retired: dict[int, SenderLink] = {}  # failed links, until their id rejoins
        self._replaced: list[tuple[float, SenderLink]] = []  # (when, link)
        self._next_sweep = 0.0
        self.admissions = Admissions(control, self._make_link, placements.chain,
                                     placements.offers, max_collectors, new_control, key,
                                     self._reserve)
        """Joins being judged and connected (the door polls them)."""

    def _reserve(self, cid: int, hello: Hello, spec: TransportSpec, local: bool,
                 remote_peers: int) -> str:
        """:data:`~weight_sync.handshake.Reserve`: see :meth:`Placements.reserve`."""
        return self._placements.reserve(cid, spec, local, remote_peers, self.links,
                                        self._publisher)

    def _make_link(self, cid: int, inc: int, hello: Hello, spec: TransportSpec,
                   local: bool) -> SenderLink:
        config, host = self._config, self._config.host
        link_spec = LinkSpec(cid, inc, self._wire_layout, backend=config.backend,
                             timeout=config.timeout,
                             bind_host=None if host in WILDCARDS else host)
        end = self._placements.end(spec, link_spec)
        return SenderLink(link_spec, end, spec.name, self._control,
                          liveness_timeout=config.liveness_timeout,
                          peer_pid=hello.pid if is_local(hello) else None, lends=spec.lends,
                          key=self._key, changed_only=config.changed_only,
                          stats=self._publisher.stats,
                          streams=spec.capabilities(link_spec).streams, local=local)

    def admit_joins(self, version: int) -> None:
        """Judge new joins (verdicts written) and install the collectors whose links
        connected since, catching them up with their current version (the learner is
        at ``version``). Never waits on a joining collector: their links connect in
        the background (:class:`Admissions`)."""
        ready, failed = self.admissions.poll(self.links)
        self.failed.update(failed)
        for link in ready:
            # The incarnations this one replaces are gone: what they left in the store
            # goes with them.
            for old in (self.links.pop(link.collector_id, None),
                        self._retired.pop(link.collector_id, None)):
                if old is not None:
                    old.close()
                    old.forget(close_signal=True)
                    self._replaced.append((time.monotonic(), old))
            self.links[link.collector_id] = link
            self.failed.pop(link.collector_id, None)
            log.info("collector %d (incarnation %d) joined at version %d over %r",
                     link.collector_id, link.incarnation, version, link.transport)
            self._publisher.catch_up(link)

    def sweep_replaced(self) -> None:
        """Delete again what replaced incarnations left in the store (see
        :data:`_FORGET_AGAIN_S`)."""
        if not self._replaced:
            return
        now = time.monotonic()
        self._replaced = [(t, link) for t, link in self._replaced
                          if now - t < _FORGET_AGAIN_S]
        slow = now >= self._next_sweep
        if slow:
            self._next_sweep = now + _SWEEP_S
        for t, link in self._replaced:
            if slow or now - t < _SWEEP_FAST_S:
                link.forget(close_signal=True)

    def retire_failed(self, pids: dict[int, int | None]) -> dict[int, str]:
        """Drop the broken links; their reasons by id (their pids go into ``pids``)."""
        newly = {c: str(link.failure) for c, link in self.links.items()
                 if link.failure is not None}
        for c in newly:
            link = self.links.pop(c)
            pids[c] = link.peer_pid
            link.close()
            link.forget(close_signal=False)
            self._retired[c] = link
        self.failed.update(newly)
        return newly
