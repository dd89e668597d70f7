"""The learner's side of ``transport="relay"``: one :class:`RelayHub` per learner, and
its :class:`RelaySender` end on each collector's link.

The hub keeps the topology (:mod:`~weight_sync.transports.relay_plan`) and a server
that streams the learner's snapshots to the collectors that receive from the learner:
the root(s) of the tree, and any collector whose parent let it down. Each link's end
only tells its collector, in the update's note, which version to fetch and from whom;
the bytes flow down the tree, each collector forwarding them while they arrive.
The learner's egress is therefore ``fanout`` copies per version whatever the number of
collectors, plus one per collector that had to fall back.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Mapping
from dataclasses import dataclass

from weight_sync.config import RelayConfig, SenderConfig
from weight_sync.control.channel import LinkChannel
from weight_sync.control.store import WILDCARDS
from weight_sync.errors import ProtocolError
from weight_sync.transports.base import LinkSpec
from weight_sync.transports.relay_plan import LEARNER, Node, plan
from weight_sync.transports.relay_wire import RelayServer, Request, Slots
from weight_sync.wire.snapshots import Snapshot

__all__ = ["RelayHub", "RelayOffer", "RelaySender", "HubInfo", "Assignment"]

log = logging.getLogger(__name__)

#: How long the hub's close waits for the fetches in progress from the learner.
_CLOSE_GRACE_S = 2.0


@dataclass(frozen=True)
class HubInfo:
    """What the learner's end publishes on each link: where the learner serves, and
    the relay's settings a collector needs."""

    host: str
    port: int
    stall_s: float
    patience_s: float
    chunk_bytes: int

    def encode(self) -> str:
        return f"{self.host} {self.port} {self.stall_s} {self.patience_s} {self.chunk_bytes}"

    @classmethod
    def decode(cls, text: str) -> HubInfo:
        try:
            host, port, stall, patience, chunk = text.split()
            return cls(host, int(port), float(stall), float(patience), int(chunk))
        except ValueError:
            raise ProtocolError(f"malformed relay hub info {text!r}") from None


@dataclass(frozen=True)
class Assignment:
    """The note of one update: fetch ``version`` from ``parent`` (a collector id, or
    ``-1`` for the learner) at ``host:port``; ``local``: the parent runs on the same
    host (by name), so try copying from its shared memory first."""

    version: int
    parent: int
    host: str
    port: int
    local: bool = False

    def encode(self) -> str:
        return f"{self.version} {self.parent} {self.host} {self.port} {int(self.local)}"

    @classmethod
    def decode(cls, text: str) -> Assignment:
        try:
            version, parent, host, port, local = text.split()
            return cls(int(version), int(parent), host, int(port), local == "1")
        except ValueError:
            raise ProtocolError(f"malformed relay note {text!r}") from None


class _Member:
    """A collector's relay node, as the hub knows it."""

    def __init__(self, spec: LinkSpec, host: str, address: tuple[str, int]) -> None:
        self.incarnation = spec.incarnation
        self.host = host
        self.address = address
        self.assigned = -1  # newest version handed to it; -1: not in the tree yet
        self.slow = False


class RelayHub:
    """The learner-wide side of the relay (built by the sender; see
    :class:`~weight_sync.transports.registry.TransportSpec`'s ``learner``).

    Attributes:
        fallbacks: requests that reached the learner from a collector whose assigned
            parent failed it.
    """

    def __init__(self, config: SenderConfig) -> None:
        self.config: RelayConfig = config.relay
        self._lock = threading.Lock()
        self._members: dict[int, _Member] = {}
        self._plan: dict[int, int] | None = None
        # Versions whose links closed before their collectors acked them: still served
        # until a newer version is handed out or the hub closes, so that a collector
        # told of a version just before the learner closed still gets it.
        self._lingering: list[int] = []
        self.fallbacks = 0
        # Serving from the start, so that collectors can probe that they reach it
        # before they join (RelayOffer); the message size comes with the first link.
        bind = "0.0.0.0" if config.host in WILDCARDS else config.host
        self._slots = Slots(0)
        self._server = RelayServer(self._slots, bind, stall_s=self.config.stall_s,
                                   chunk_bytes=self.config.chunk_bytes,
                                   on_request=self._on_request)
        self.host = socket.gethostname() if bind in WILDCARDS else bind
        """The address collectors reach the learner's relay server at."""
        self.port = self._server.address[1]
        """Its port."""

    def end(self, spec: LinkSpec) -> RelaySender:
        """The learner's end of one collector's link."""
        return RelaySender(self, spec)

    def parents(self) -> dict[int, int]:
        """The current topology: each collector in the tree and its parent's id
        (``-1``: the learner)."""
        with self._lock:
            return dict(self._current_plan())

    def slow(self) -> list[int]:
        """Collectors marked slow (leaves from then on)."""
        with self._lock:
            return sorted(c for c, m in self._members.items() if m.slow)

    # -- for the ends --------------------------------------------------------------------
    def serve(self, spec: LinkSpec) -> HubInfo:
        """Say where the learner's server is (it serves messages of ``spec``'s size)."""
        with self._lock:
            self._slots.nbytes = spec.layout.nbytes
        return HubInfo(self.host, self.port, self.config.stall_s, self.config.patience_s,
                       self.config.chunk_bytes)

    def join(self, spec: LinkSpec, host: str, address: tuple[str, int]) -> None:
        with self._lock:
            self._members.pop(spec.collector_id, None)  # an older incarnation's place
            head = next((c for c, m in self._members.items() if m.host == host
                         and not m.slow), None)
            self._members[spec.collector_id] = _Member(spec, host, address)
            self._plan = None
        log.info("relay: %s on host %s %s", spec.who(), host,
                 "heads its host (receives from the network)" if head is None
                 else f"receives from its host's head, collector {head}")

    def leave(self, spec: LinkSpec) -> None:
        with self._lock:
            member = self._members.get(spec.collector_id)
            if member is not None and member.incarnation == spec.incarnation:
                del self._members[spec.collector_id]
                self._plan = None

    def assign(self, spec: LinkSpec, snapshot: Snapshot) -> Assignment:
        """Hand ``snapshot`` to a collector: pin it here and say where to fetch it
        from, the nearest ancestor that is receiving that version (the learner if
        none is)."""
        snapshot.retain()
        if not self._slots.pin(snapshot.version, snapshot.buffer, snapshot.release):
            snapshot.release()  # held already, for another link
        version, cid = snapshot.version, spec.collector_id
        with self._lock:
            older = [v for v in self._lingering if v < version]
            self._lingering = [v for v in self._lingering if v >= version]
        for old in older:
            self._slots.unpin(old)
        with self._lock:
            member = self._members.get(cid)
            if member is None or member.incarnation != spec.incarnation:
                self._slots.unpin(version)
                raise ProtocolError(f"relay: {spec.who()} is not a member of the relay")
            if member.assigned < 0:
                self._plan = None  # it enters the tree
            member.assigned = version
            parents = self._current_plan()
            parent = parents.get(cid, LEARNER)
            while parent != LEARNER and self._members[parent].assigned != version:
                parent = parents.get(parent, LEARNER)
            if parent == LEARNER:
                return Assignment(version, LEARNER, self.host, self.port)
            host, port = self._members[parent].address
            return Assignment(version, parent, host, port,
                              local=self._members[parent].host == member.host)

    def release(self, version: int) -> None:
        """A link no longer needs ``version`` (its collector acked it)."""
        self._slots.unpin(version)

    def linger(self, version: int) -> None:
        """A link closed with ``version`` unacked: keep serving it until a newer
        version is handed out or the hub closes."""
        with self._lock:
            self._lingering.append(version)

    def _current_plan(self) -> dict[int, int]:
        if self._plan is None:
            nodes = [Node(c, m.host, m.slow) for c, m in self._members.items()
                     if m.assigned >= 0]
            self._plan = plan(nodes, self.config.fanout)
        return self._plan

    def _on_request(self, request: Request) -> None:
        """A request reaching the learner from a collector assigned another parent: that
        parent stalled, was too slow, or died. If it had been handed the version, it
        is marked slow: a leaf from the next version on."""
        told = request.told_parent
        if told == LEARNER:
            return
        with self._lock:
            self.fallbacks += 1
            member = self._members.get(told)
            if member is not None and member.assigned >= request.version and not member.slow:
                member.slow = True
                self._plan = None
                log.warning("relay: collector %d fell back to the learner for version %d; "
                            "collector %d is a leaf from now on", request.collector_id,
                            request.version, told)

    def close(self) -> None:
        """Stop serving (after the fetches in progress end, at most
        :data:`_CLOSE_GRACE_S`) and give every held snapshot back; idempotent."""
        if not self._slots.wait_unread(_CLOSE_GRACE_S):
            log.warning("relay: closing with fetches from the learner still in progress "
                        "after %.1fs; those collectors get PeerGone", _CLOSE_GRACE_S)
        self._server.close()
        self._slots.clear()


class RelayOffer:
    """Publishes where the learner's relay server listens; accepts the collectors that
    reached it (:func:`~weight_sync.transports.relay_receiver.probe_relay`): a
    collector behind a firewall, or that resolves the learner's name elsewhere, is
    placed on another transport instead of failing its first fetch."""

    def __init__(self, hub: object) -> None:
        if not isinstance(hub, RelayHub):
            raise ProtocolError(f"the relay's offer needs its RelayHub, got {hub!r}")
        self._where = f"{hub.host}:{hub.port}"
        self.params = {"host": hub.host, "port": str(hub.port)}

    def accepts(self, evidence: Mapping[str, str]) -> bool:
        return evidence.get("reached") == self._where

    def close(self) -> None:
        return None  # the hub closes its server


class _Relayed:
    """A version handed to a collector: it fetches it itself; the hub holds the
    snapshot until the collector acks (``finish``) or the link closes."""

    def __init__(self, end: RelaySender, assignment: Assignment) -> None:
        self.note = assignment.encode()
        self._end = end
        self._version = assignment.version

    def done(self) -> bool:
        return False  # the learner may still have to serve it, until the ack

    def finish(self, timeout: float) -> None:
        self._end.released(self._version)


class RelaySender:
    """The learner's end of one collector's link: publishes where the learner serves,
    learns where the collector serves, and assigns each version a parent."""

    def __init__(self, hub: RelayHub, spec: LinkSpec) -> None:
        self.spec = spec
        self._hub = hub
        self._pinned: list[int] = []
        self._joined = False

    def connect(self, channel: LinkChannel, timeout: float) -> None:
        channel.publish("hub", self._hub.serve(self.spec).encode())
        try:
            host, address, port = channel.read("node", timeout).split()
        except ValueError:
            raise ProtocolError(f"relay: malformed node address from {self.spec.who()}") \
                from None
        self._hub.join(self.spec, host, (address, int(port)))
        self._joined = True

    def send(self, snapshot: Snapshot) -> _Relayed:
        assignment = self._hub.assign(self.spec, snapshot)
        self._pinned.append(assignment.version)
        return _Relayed(self, assignment)

    def released(self, version: int) -> None:
        if version in self._pinned:
            self._pinned.remove(version)
            self._hub.release(version)

    def close(self) -> None:
        for version in self._pinned:
            self._hub.linger(version)
        self._pinned.clear()
        if self._joined:
            self._joined = False
            self._hub.leave(self.spec)
