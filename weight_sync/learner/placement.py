"""Where the learner places each collector: the transports it offers, and what a
placement reserves.

:class:`Placements` sets up each transport of the chain (its learner-wide side and the
offer collectors read at join); under ``"auto"`` a transport this host cannot serve (a
full ``/dev/shm``, a relay port that cannot be bound) is left out with a warning instead
of failing the learner. Before a collector is placed, :meth:`Placements.reserve` says
whether it may be: room in ``/dev/shm`` for the snapshots a zero-copy collector reads in
place, and under ``"auto"`` the relay only for collectors on other hosts, from the second
one on. :meth:`Placements.end` makes the learner's end of a placed collector's link.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from weight_sync.config import SenderConfig
from weight_sync.errors import ConfigError, SharedMemoryFull, WeightSyncError
from weight_sync.learner.publisher import Publisher
from weight_sync.learner.sender_link import SenderLink
from weight_sync.transports.base import LearnerSide, LinkSpec, Offer, SenderTransport
from weight_sync.transports.registry import AUTO, TransportSpec
from weight_sync.wire.shm import SHM_DIR, shm_room

__all__ = ["Placements"]

log = logging.getLogger(__name__)


class Placements:
    """The transports a learner offers (see the module).

    Args:
        config: the sender's settings (``transport``, ``backend``).
        chain: the proposed transport and its fallbacks, best first.

    Raises:
        OSError, WeightSyncError: a transport named by the user cannot be set up (with
            ``"auto"``: only if the last of the chain cannot).
    """

    def __init__(self, config: SenderConfig, chain: list[TransportSpec]) -> None:
        self.config = config
        self.sides: dict[str, LearnerSide] = {}
        self.offers: dict[str, Offer] = {}
        self._on_shm: set[int] = set()  # ids placed where snapshots are read in place
        try:
            self.chain = [spec for spec in chain if self._prepare(spec, spec is chain[-1])]
        except BaseException:
            self.close()
            raise

    def _prepare(self, spec: TransportSpec, last: bool) -> bool:
        """Set up ``spec``'s learner side and offer; whether it stays in the chain."""
        try:
            if spec.learner is not None:
                self.sides[spec.name] = spec.learner(self.config)
            if spec.offer is not None and self.config.backend in spec.backends:
                self.offers[spec.name] = spec.offer(self.sides.get(spec.name))
        except (OSError, WeightSyncError) as exc:  # SharedMemoryFull is both
            if self.config.transport != AUTO or last:
                raise
            for held in (self.offers.pop(spec.name, None), self.sides.pop(spec.name, None)):
                if held is not None:
                    held.close()
            log.warning("transport %r left out of %r on this learner: %s", spec.name,
                        AUTO, exc)
            return False
        return True

    def side(self, transport: str) -> LearnerSide:
        """The learner-wide state of ``transport``.

        Raises:
            ConfigError: there is none for that transport.
        """
        try:
            return self.sides[transport]
        except KeyError:
            raise ConfigError(f"no learner side for transport {transport!r}; this sender "
                              f"has {sorted(self.sides)}") from None

    def reserve(self, cid: int, spec: TransportSpec, local: bool, remote_peers: int,
                links: Mapping[int, SenderLink], publisher: Publisher) -> str:
        """Before collector ``cid`` is placed on ``spec``: reserve what it needs there,
        or say why it cannot be (:data:`~weight_sync.handshake.Reserve`).

        Args:
            local: the collector shares the learner's host.
            remote_peers: other collectors off the learner's host judged with it.
            links: the live links.
            publisher: the learner's snapshots (moved to shared memory for zero-copy).
        """
        if spec.shared_snapshots:
            return self._reserve_shared(cid, publisher)
        if self.config.transport != AUTO or spec.name != "relay":
            return ""
        if local:  # the relay's point is the network (and its slots are shared memory)
            return "the collector shares the learner's host; the relay is for other hosts"
        others = remote_peers + sum(1 for c, link in links.items()
                                    if c != cid and not link.local)
        if not others:
            # Measured on the test bed (1 Gbit/s, 100 MB): one collector on one other
            # host, relay 847 ms, direct 837 ms; the relay pays off from two collectors.
            return ("the only collector off the learner's host: direct sends cost less "
                    "than the relay for one")
        return ""

    def _reserve_shared(self, cid: int, publisher: Publisher) -> str:
        """Room in ``/dev/shm`` for the snapshots' bound with ``cid`` reading them in
        place (2 per such collector, plus 2: see ``WeightSender.buffers_allocated``),
        and the snapshots kept for joins moved there."""
        users = len(self._on_shm | {cid})
        pool = publisher.pool
        need = (2 * users + 2) * pool.layout.nbytes - pool.shared_bytes
        room = shm_room()
        if room < need:
            return (f"{SHM_DIR} has {room / 1e6:.1f} MB free, {need / 1e6:.1f} MB more are "
                    f"needed for the snapshots of {users} collector(s) reading them in place")
        try:
            publisher.share()
        except SharedMemoryFull as exc:
            return str(exc)
        self._on_shm.add(cid)
        return ""

    def end(self, spec: TransportSpec, link_spec: LinkSpec) -> SenderTransport:
        """The learner's end of a link placed on ``spec``."""
        if not spec.shared_snapshots:
            self._on_shm.discard(link_spec.collector_id)
        side = self.sides.get(spec.name)
        if side is not None:
            return side.end(link_spec)
        assert spec.sender is not None  # TransportSpec checks it has one or the other
        return spec.sender(link_spec)

    def close(self) -> None:
        """Release the offers and the learner sides; idempotent."""
        held: list[Offer | LearnerSide] = [*self.offers.values(), *self.sides.values()]
        for thing in held:
            thing.close()
        self.offers.clear()
        self.sides.clear()
