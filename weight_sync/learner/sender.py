"""The learner's side: :class:`WeightSender` keeps N collectors current.

Example::

    sender = WeightSender(policy, num_collectors=3)
    launch_collectors(sender.connection_info)      # hand each process the small info
    sender.connect(timeout=60)                     # rendezvous + layout check + initial sync
    for step in range(steps):
        optimizer.step()
        sender.send_weights_async()                # snapshot + send; returns at once
        ...                                        # keep training
        sender.wait_ack(timeout=10)                # every live collector applied it
    sender.close()

A collector that dies is reported once (``CollectorFailed`` carrying an
:class:`~weight_sync.metrics.AckResult`) and then no longer waited for; a process that
connects again with its id is admitted on the next call and caught up with the newest
version.
"""

from __future__ import annotations

import logging
import socket
import time
from typing import Any

import torch

from weight_sync.config import ConnectionInfo, SenderConfig, wire_dtype
from weight_sync.control.channel import Control
from weight_sync.control.liveness import LearnerHeartbeat
from weight_sync.control.store import WILDCARDS, StoreServer
from weight_sync.errors import (
    ClosedError,
    ConfigError,
    ProtocolError,
    WeightSyncTimeout,
)
from weight_sync.learner.admission import Admissions, is_local
from weight_sync.learner.publisher import Publisher
from weight_sync.learner.sender_link import SenderLink
from weight_sync.metrics import AckResult, SyncStats
from weight_sync.transports.base import LearnerSide, LinkSpec, Offer
from weight_sync.transports.registry import TransportSpec, sender_chain
from weight_sync.wire.auth import StreamKey, new_nonce, resolve_secret
from weight_sync.wire.layout import BufferLayout, named_leaves
from weight_sync.wire.protocol import Hello
from weight_sync.wire.snapshots import SnapshotPool

__all__ = ["WeightSender"]

log = logging.getLogger(__name__)

# wait_ack waits on the store in slices this long, checking links for failure between.
_ACK_SLICE_S = 1.0
# close() waits at most this long for the live collectors to read it.
_CLOSE_GRACE_S = 2.0
# Joins are looked for at most this often by send_weights_async / wait_ack (a store
# round trip each): a (re)joining collector waits this much longer at most.
_JOIN_CHECK_S = 0.05


class WeightSender:
    """Pushes versions of a policy's weights to collectors.

    Args:
        policy: an ``nn.Module``, a TensorDict or a ``state_dict`` whose tensors are
            read (not copied) at every :meth:`send_weights_async`.
        num_collectors: how many collectors :meth:`connect` waits for (ids 0..N-1).
        max_collectors: highest number of collector ids accepted (elastic joins of ids
            ``num_collectors..max_collectors-1`` at run time); defaults to N.
        config: where to listen and how long to wait; keyword arguments override
            its fields (``host``, ``port``, ``name``, ``backend``, ``timeout``).
        version: the version :meth:`connect` syncs first (the next send is +1). A
            learner resumed from a checkpoint passes the checkpoint's, so that
            collectors re-attaching to it (``ReceiverConfig.reattach_timeout``) see
            versions go on growing.

    Raises:
        InvalidWeightsError: empty or non-tensor weights.
        ConnectionFailed: the store cannot bind its address.
    """

    def __init__(self, policy: Any, num_collectors: int, config: SenderConfig | None = None,
                 *, max_collectors: int | None = None, version: int = 0,
                 **overrides: Any) -> None:
        base = config or SenderConfig()
        self.config = SenderConfig(**{**base.__dict__, **overrides})
        if not isinstance(num_collectors, int) or num_collectors < 1:
            raise ConfigError(f"num_collectors must be an int >= 1, got {num_collectors!r}")
        max_collectors = num_collectors if max_collectors is None else max_collectors
        if not isinstance(max_collectors, int) or max_collectors < num_collectors:
            raise ConfigError(f"max_collectors must be an int >= num_collectors "
                              f"({num_collectors}), got {max_collectors!r}")
        chain = sender_chain(self.config)
        if not isinstance(version, int) or isinstance(version, bool) or version < 0:
            raise ConfigError(f"version must be an int >= 0, got {version!r}")
        self.num_collectors = num_collectors
        self.max_collectors = max_collectors
        self._sources = list(named_leaves(policy).values())
        self.layout = BufferLayout.from_weights(policy)
        self.wire_layout = self.layout.on_wire(wire_dtype(self.config.wire_dtype))
        """The layout of each message (``layout`` unless ``wire_dtype`` narrows it)."""
        nonce = new_nonce()
        secret = resolve_secret(self.config.secret, "SenderConfig")
        self._key = None if secret is None else StreamKey(secret, self.config.name, nonce)
        self._server = StoreServer(self.config.host, self.config.port, self.config.timeout)
        self._offers: dict[str, Offer] = {}
        self._sides: dict[str, LearnerSide] = {}
        try:
            self._control = self._new_control()
            self._heartbeat = LearnerHeartbeat(self._new_control(),
                                               self.connection_info.heartbeat_s)
            for spec in chain:
                if spec.offer is not None and self.config.backend in spec.backends:
                    self._offers[spec.name] = spec.offer()
                if spec.learner is not None:
                    self._sides[spec.name] = spec.learner(self.config)
            self._control.publish_stream(
                self.layout.to_json(), self.connection_info.to_json(),
                {name: offer.params for name, offer in self._offers.items()}, nonce)
        except BaseException:
            self._release_offers()
            self._server.stop()
            raise
        self.stats = SyncStats()
        self._publisher = Publisher(
            SnapshotPool(self.wire_layout, self._device(), shared=chain[0].shared_snapshots,
                         # with a secret, the signed digest covers it all
                         checksum=self.config.checksum and self._key is None,
                         digests=self._key is not None,
                         leaf_digests=self.config.changed_only),
            self.stats)
        self.links: dict[int, SenderLink] = {}
        """The live collectors' links, by collector id."""
        self.failed: dict[int, str] = {}
        """Collectors whose link broke (id -> reason), until they join again."""
        self._admissions = Admissions(self._control, self._make_link, chain, self._offers,
                                      max_collectors, self._new_control, self._key)
        self._joins_read = 0.0  # when joins were last looked for
        self.version = version
        self._connected = False
        self._closed = False

    def _new_control(self) -> Control:
        """A new client of this learner's store (one per thread that uses it)."""
        return Control.connect(self._server.local_host, self._server.port, self.config.name,
                               self.config.timeout)

    def _device(self) -> torch.device:
        if self.config.backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    @property
    def connection_info(self) -> ConnectionInfo:
        """What a collector process needs to connect (picklable)."""
        host = self.config.host
        return ConnectionInfo(
            # A wildcard address binds every interface; collectors dial the host's name.
            host=socket.gethostname() if host in WILDCARDS else host,
            port=self._server.port, name=self.config.name,
            num_collectors=self.num_collectors, backend=self.config.backend,
            max_collectors=self.max_collectors,
            heartbeat_s=self.config.liveness_timeout / 10,
            wire_dtype=self.config.wire_dtype, changed_only=self.config.changed_only,
        )

    @property
    def buffers_allocated(self) -> int:
        """Message buffers allocated so far. Bounded: per collector at most one in
        flight and one pending, shared between collectors, plus the newest (N + 2), and
        with a zero-copy transport the one each collector uses (2N + 2 at worst; as
        collectors usually share versions, a few in practice)."""
        return self._publisher.pool.allocated

    @property
    def buffers_in_use(self) -> int:
        """Message buffers held now (in flight, pending, lent to a collector, newest)."""
        pool = self._publisher.pool
        return pool.allocated - len(pool.free)

    @property
    def transports(self) -> dict[int, str]:
        """The transport each live collector's link uses, by collector id."""
        return {cid: link.transport for cid, link in self.links.items()}

    def learner_side(self, transport: str) -> LearnerSide:
        """The learner-wide state of ``transport`` (e.g. the relay's
        :class:`~weight_sync.transports.relay_sender.RelayHub`: its topology).

        Raises:
            ConfigError: this sender has none for that transport.
        """
        try:
            return self._sides[transport]
        except KeyError:
            raise ConfigError(f"no learner side for transport {transport!r}; this sender "
                              f"has {sorted(self._sides)}") from None

    def __enter__(self) -> WeightSender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self, what: str) -> None:
        if self._closed:
            raise ClosedError(f"WeightSender.{what}() after close()")
        if what != "connect" and not self._connected:
            raise ProtocolError(f"WeightSender.{what}() before connect()")

    def connect(self, timeout: float = 60.0) -> None:
        """Wait for collectors 0..N-1, check their layouts, and sync the weights to all.

        Raises:
            WeightSyncTimeout: naming the collectors that did not join in time.
            LayoutMismatchError: a collector's weights differ (the differences listed).
            DuplicateCollectorError: never for a duplicate alone (the first live
                process of an id is served; the duplicate is refused and raises).
        """
        self._check_open("connect")
        deadline = time.monotonic() + timeout
        self.links.update(self._admissions.initial(range(self.num_collectors), timeout))
        self._connected = True
        self._publisher.publish(self._sources, self.version, self.links)
        self.wait_ack(max(deadline - time.monotonic(), 0.001))
        log.info("connected %d collector(s) on %s:%s over %s, layout %s (%d bytes)",
                 self.num_collectors, self.config.host, self._server.port,
                 sorted(set(self.transports.values())), self.layout.digest,
                 self.wire_layout.nbytes)

    def _make_link(self, cid: int, inc: int, hello: Hello, spec: TransportSpec) -> SenderLink:
        host = self.config.host
        link_spec = LinkSpec(cid, inc, self.wire_layout, backend=self.config.backend,
                             timeout=self.config.timeout,
                             bind_host=None if host in WILDCARDS else host)
        side = self._sides.get(spec.name)
        if side is not None:
            end = side.end(link_spec)
        else:
            assert spec.sender is not None  # TransportSpec checks it has one or the other
            end = spec.sender(link_spec)
        return SenderLink(link_spec, end, spec.name, self._control,
                          liveness_timeout=self.config.liveness_timeout,
                          peer_pid=hello.pid if is_local(hello) else None, lends=spec.lends,
                          key=self._key, changed_only=self.config.changed_only,
                          stats=self.stats, streams=spec.capabilities(link_spec).streams)

    def _admit_joins(self, *, force: bool = False) -> None:
        """Install collectors that (re)joined, catching them up with the newest
        published version (at most one look per ``_JOIN_CHECK_S`` unless ``force``).

        Their links are connected in the background (:class:`Admissions`), so this
        never waits on a joining collector.
        """
        now = time.monotonic()
        if not force and now - self._joins_read < _JOIN_CHECK_S:
            return
        self._joins_read = now
        ready, failed = self._admissions.poll(self.links)
        self.failed.update(failed)
        for link in ready:
            old = self.links.pop(link.collector_id, None)
            if old is not None:
                old.close()
            self.links[link.collector_id] = link
            self.failed.pop(link.collector_id, None)
            log.info("collector %d (incarnation %d) joined at version %d over %r",
                     link.collector_id, link.incarnation, self.version, link.transport)
            self._publisher.catch_up(link)

    def send_weights_async(self, weights: Any = None) -> int:
        """Snapshot the weights as a new version and start sending it; never blocks
        on a collector.

        Args:
            weights: weights to send instead of the policy's (same layout).

        Returns:
            The new version number.
        """
        self._check_open("send_weights_async")
        sources = self._sources
        if weights is not None:
            leaves = named_leaves(weights)
            BufferLayout.from_tensors(leaves).check_compatible(
                self.layout.to_json(), who="send_weights_async(weights=...)", mine="weights")
            sources = list(leaves.values())
        self._admit_joins()
        self.version += 1
        try:
            self._publisher.publish(sources, self.version, self.links)
        except BaseException:
            self.version -= 1  # never published: the next call reuses the number
            raise
        return self.version

    def send_weights(self, weights: Any = None, timeout: float = 60.0) -> AckResult:
        """:meth:`send_weights_async` then :meth:`wait_ack`."""
        self.send_weights_async(weights)
        return self.wait_ack(timeout)

    def _retire_failed(self, pids: dict[int, int | None]) -> dict[int, str]:
        """Drop the broken links; their reasons by id (their pids go into ``pids``)."""
        newly = {c: str(link.failure) for c, link in self.links.items()
                 if link.failure is not None}
        for c in newly:
            link = self.links.pop(c)
            pids[c] = link.peer_pid
            link.close()
        self.failed.update(newly)
        return newly

    def wait_ack(self, timeout: float = 60.0) -> AckResult:
        """Block until every live collector applied the newest version.

        Returns:
            The :class:`AckResult` (all live collectors acked).

        Raises:
            CollectorFailed: a collector's link broke during the wait; raised after the
                others acked (or the timeout), carrying the ``AckResult``. That
                collector is no longer waited for until it joins again.
            WeightSyncTimeout: after ``timeout`` s, naming the lagging collectors and
                carrying the ``AckResult``.
        """
        self._check_open("wait_ack")
        start = time.monotonic()
        deadline = start + timeout
        target = self.version
        newly_failed: dict[int, str] = {}
        failed_pids: dict[int, int | None] = {}
        acked: set[int] = set()  # links whose awaited ack the last wait saw
        admit = True
        while True:
            if admit:
                self._admit_joins()
            for cid, link in self.links.items():
                link.progress(acked=cid in acked)
            newly_failed.update(self._retire_failed(failed_pids))
            lagging = [link for link in self.links.values() if link.acked_version < target]
            remaining = deadline - time.monotonic()
            if not lagging or remaining <= 0:
                break
            waiting = {link.collector_id: a for link in lagging
                       if (a := link.awaited_ack) is not None}
            if not waiting:  # cannot happen after progress(); never spin
                break
            # Slices: between them links are checked for failure, so a dead collector
            # costs a slice, not the whole timeout.
            try:
                self._control.wait_acks(waiting.values(), min(remaining, _ACK_SLICE_S),
                                        f"acks of version {target}")
                acked, admit = set(waiting), False
            except WeightSyncTimeout:  # re-check links, joins and the deadline
                acked, admit = set(), True
        acked_versions = {c: link.acked_version for c, link in self.links.items()}
        result = AckResult.of(target, acked_versions, newly_failed)
        result.raise_if_incomplete(time.monotonic() - start, failed_pids, acked_versions)
        self._publisher.record(target, self.wire_layout.nbytes, len(self.links))
        return result

    def wait_for(self, collector_ids: Any, timeout: float = 60.0) -> AckResult:
        """Block until each of ``collector_ids`` is connected and applied the newest
        version, admitting collectors that (re)join meanwhile.

        For a restarted or elastic collector: start its process, then call this to
        know it is live. Ids that are already current return at once.

        Returns:
            The :class:`AckResult` of the newest version (as :meth:`wait_ack`).

        Raises:
            WeightSyncTimeout: naming the ids not connected (or not current) in time.
            LayoutMismatchError, DuplicateCollectorError: the newest incarnation of one
                of the ids was refused, and no process serves it.
            ConfigError: an id outside ``0..max_collectors-1``.
            CollectorFailed: a link broke during the wait.
        """
        self._check_open("wait_for")
        ids = sorted(set(collector_ids))
        bad = [c for c in ids if not isinstance(c, int) or not 0 <= c < self.max_collectors]
        if bad:
            raise ConfigError(f"wait_for: collector ids must be in [0, {self.max_collectors}), "
                              f"got {bad!r}")
        start = time.monotonic()
        deadline = start + timeout
        while True:
            self._admit_joins(force=True)
            absent = [c for c in ids if c not in self.links]
            if not absent:
                return self.wait_ack(max(deadline - time.monotonic(), 0.001))
            for c in absent:
                refusal = self._admissions.refusal(c)
                if refusal is not None:
                    raise refusal
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WeightSyncTimeout(
                    f"collector(s) {absent} not connected after {time.monotonic() - start:.2f}s"
                    f" (version {self.version})")
            self._admissions.wait(absent, min(remaining, _ACK_SLICE_S))

    def _release_offers(self) -> None:
        held: list[Offer | LearnerSide] = [*self._offers.values(), *self._sides.values()]
        for thing in held:
            thing.close()
        self._offers.clear()
        self._sides.clear()

    def close(self) -> None:
        """Tell the collectors the stream ended, release links, memory and the offers,
        and stop the store server; idempotent."""
        if self._closed:
            return
        self._closed = True
        self._admissions.close()
        for link in self.links.values():
            link.close()
        # The store server lives in this process: keep it up until the live collectors
        # read the close (briefly), or a collector would see the store vanish instead.
        self._control.wait_byes([(c, link.incarnation) for c, link in self.links.items()
                                 if link.failure is None],
                                min(_CLOSE_GRACE_S, self.config.timeout))
        self.links.clear()
        self._publisher.close()
        self._release_offers()
        self._heartbeat.close()
        self._control.close()
        # Collectors normally read the close first (ClosedError); one that reads later
        # sees PeerGone.
        self._server.stop()
