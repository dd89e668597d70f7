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
connects again with its id is admitted and caught up with the newest version by the
learner's door, a thread of its own, whatever the learner is doing meanwhile (training,
evaluating, sleeping between calls): refusals too are answered at once.

Thread safety: the public calls may come from several threads. They are serialised by
one lock around the sender's state (never held across a blocking wait), so each
``send_weights_async`` gets a version of its own and publishes it whole; ``wait_ack``
and ``wait_for`` wait outside it, so a send from another thread never waits for them.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterable
from typing import Any

import torch

from weight_sync.config import (
    ConnectionInfo,
    SenderConfig,
    check_count,
    check_timeout,
    wire_dtype,
)
from weight_sync.control.channel import Control
from weight_sync.control.liveness import LearnerHeartbeat
from weight_sync.control.store import WILDCARDS, StoreServer
from weight_sync.errors import (
    ClosedError,
    ConfigError,
    ProtocolError,
    WeightSyncError,
    WeightSyncTimeout,
)
from weight_sync.learner.acks import ack_result, wait_placements
from weight_sync.learner.admission import Door
from weight_sync.learner.members import Members
from weight_sync.learner.placement import Placements
from weight_sync.learner.publisher import Publisher
from weight_sync.learner.sender_link import SenderLink
from weight_sync.metrics import AckResult, SyncStats
from weight_sync.transports.base import LearnerSide
from weight_sync.transports.registry import sender_chain
from weight_sync.wire.auth import StreamKey, new_nonce, resolve_secret
from weight_sync.wire.layout import BufferLayout, named_leaves
from weight_sync.wire.live import LiveLeaves
from weight_sync.wire.snapshots import SnapshotPool

__all__ = ["WeightSender"]

log = logging.getLogger(__name__)

# wait_ack waits on the store in slices this long, checking links for failure between.
_ACK_SLICE_S = 1.0
# close() waits at most this long for the live collectors to read it.
_CLOSE_GRACE_S = 2.0
# The door looks for joins this often (a store round trip each): a (re)joining
# collector waits this much longer at most, whatever the learner's caller is doing.
_JOIN_CHECK_S = 0.05


class WeightSender:
    """Pushes versions of a policy's weights to collectors.

    Args:
        policy: an ``nn.Module``, a TensorDict or a ``state_dict`` whose tensors are
            read (not copied) at every :meth:`send_weights_async`. A module's tensors
            are the ones it holds at each send (also after ``load_state_dict(...,
            assign=True)`` or a rebound buffer); a TensorDict's or ``state_dict``'s are
            the ones given here (pass the module if its tensors may be replaced).
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
        InvalidWeightsError: empty or non-tensor weights, or tensors on the meta device.
        ConnectionFailed: the store cannot bind its address.
    """

    def __init__(self, policy: Any, num_collectors: int, config: SenderConfig | None = None,
                 *, max_collectors: int | None = None, version: int = 0,
                 **overrides: Any) -> None:
        base = config or SenderConfig()
        self.config = SenderConfig(**{**base.__dict__, **overrides})
        check_count("num_collectors", num_collectors, 1)
        max_collectors = check_count(
            f"max_collectors (at least num_collectors, {num_collectors})",
            num_collectors if max_collectors is None else max_collectors, num_collectors)
        chain = sender_chain(self.config)
        if not isinstance(version, int) or isinstance(version, bool) or version < 0:
            raise ConfigError(f"version must be an int >= 0, got {version!r}")
        self.num_collectors = num_collectors
        self.max_collectors = max_collectors
        self.layout = BufferLayout.from_weights(policy)
        self._sources = LiveLeaves(policy, self.layout, "WeightSender")
        self.wire_layout = self.layout.on_wire(wire_dtype(self.config.wire_dtype))
        """The layout of each message (``layout`` unless ``wire_dtype`` narrows it)."""
        nonce = new_nonce()
        secret = resolve_secret(self.config.secret, "SenderConfig")
        self._key = None if secret is None else StreamKey(secret, self.config.name, nonce)
        self._server = StoreServer(self.config.host, self.config.port, self.config.timeout)
        try:
            self._control = self._new_control()
            self._heartbeat = LearnerHeartbeat(self._new_control(),
                                               self.connection_info.heartbeat_s)
            self._placements = Placements(self.config, chain)
            self._control.publish_stream(
                self.layout.to_json(), self.connection_info.to_json(),
                {name: offer.params for name, offer in self._placements.offers.items()},
                nonce)
        except BaseException:
            if hasattr(self, "_placements"):
                self._placements.close()
            self._server.stop()
            raise
        self.stats = SyncStats()
        self._publisher = Publisher(
            # In shared memory once a collector is placed where it is read in place.
            SnapshotPool(self.wire_layout, self._device(), shared=False,
                         # with a secret, the signed digest covers it all
                         checksum=self.config.checksum and self._key is None,
                         digests=self._key is not None,
                         leaf_digests=self.config.changed_only),
            self.stats)
        self._members = Members(self.config, self.wire_layout, self._control,
                                self._new_control, self._placements, self._publisher,
                                self._key, max_collectors)
        self.links: dict[int, SenderLink] = self._members.links
        """The live collectors' links, by collector id (the door adds to it at any time:
        read a copy, e.g. ``sorted(sender.links)``)."""
        self.failed: dict[int, str] = self._members.failed
        """Collectors whose link broke (id -> reason), until they join again."""
        self._admissions = self._members.admissions
        self._connecting = False  # connect() is waiting for the initial collectors
        self.version = version
        self._connected = False
        self._closed = False
        # Guards the links, the publisher, the admissions and the main store client
        # (self._control), which only non-blocking store calls use: the caller's threads
        # and the door take it; blocking waits run outside it, each on its thread's own
        # client (_waiter). Re-entrant: connect() calls wait_ack().
        self._lock = threading.RLock()
        self._admitted = threading.Condition(self._lock)  # notified after each door round
        self._waiters = threading.local()
        self._waiter_clients: list[Control] = []
        self._door: Door | None = None

    def _new_control(self) -> Control:
        """A new client of this learner's store (one per thread that uses it)."""
        return Control.connect(self._server.local_host, self._server.port, self.config.name,
                               self.config.timeout)

    def _waiter(self) -> Control:
        """The calling thread's own store client, for the blocking waits (made on first
        use, closed by :meth:`close`)."""
        client: Control | None = getattr(self._waiters, "control", None)
        if client is None:
            client = self._waiters.control = self._new_control()
            with self._lock:
                self._waiter_clients.append(client)
        return client

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
        with self._lock:
            return {cid: link.transport for cid, link in self.links.items()}

    def learner_side(self, transport: str) -> LearnerSide:
        """The learner-wide state of ``transport`` (e.g. the relay's
        :class:`~weight_sync.transports.relay_sender.RelayHub`: its topology).

        Raises:
            ConfigError: this sender has none for that transport.
        """
        return self._placements.side(transport)

    def __enter__(self) -> WeightSender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self, what: str) -> None:
        if self._closed:
            raise ClosedError(f"WeightSender.{what}() after close()")
        if what != "connect" and not self._connected:
            raise ProtocolError(f"WeightSender.{what}() before connect()")
        failure = None if self._door is None else self._door.failure
        if failure is not None:
            raise WeightSyncError(f"WeightSender.{what}(): the learner's admission thread "
                                  f"failed: {failure!r}") from failure

    def connect(self, timeout: float = 60.0) -> None:
        """Wait for collectors 0..N-1, check their layouts, and sync the weights to all.

        Raises:
            WeightSyncTimeout: naming the collectors that did not join in time.
            LayoutMismatchError: a collector's weights differ (the differences listed).
            DuplicateCollectorError: never for a duplicate alone (the first live
                process of an id is served; the duplicate is refused and raises).
        """
        timeout = check_timeout("WeightSender.connect", timeout, zero=False)
        with self._lock:
            self._check_open("connect")
            if self._connected or self._connecting:
                raise ProtocolError("WeightSender.connect() called twice")
            self._connecting = True
        deadline = time.monotonic() + timeout
        # Outside the lock, so that a close() from another thread (a collector that
        # failed to start) ends this wait at once: it stops the store the wait is on.
        # Nothing else uses the main client before _connected: the door opens below.
        try:
            links = self._admissions.initial(range(self.num_collectors), timeout)
        except WeightSyncError:
            if self._closed:
                raise ClosedError("WeightSender closed during connect()") from None
            raise
        finally:
            self._connecting = False
        with self._lock:
            if self._closed:
                for link in links.values():
                    link.close()
                raise ClosedError("WeightSender closed during connect()")
            self.links.update(links)
            self._connected = True
            self._publisher.publish(self._sources.current(), self.version, self.links)
            self._door = Door(self._door_round, _JOIN_CHECK_S)
        self.wait_ack(max(deadline - time.monotonic(), 0.001))
        log.info("connected %d collector(s) on %s:%s over %s, layout %s (%d bytes)",
                 self.num_collectors, self.config.host, self._server.port,
                 sorted(set(self.transports.values())), self.layout.digest,
                 self.wire_layout.nbytes)

    def _door_round(self) -> None:
        """One round of the door (its thread): admit joins, start the sends that wait
        behind an in-flight message whose ack came (acks arrive after the apply, from
        the collector's listener: a learner that calls nothing must not hold its next
        version back), then wake :meth:`wait_for`."""
        with self._lock:
            if self._closed:
                return
            self._members.admit_joins(self.version)
            for link in self.links.values():
                if link.waiting_to_send:
                    link.progress()
            self._admitted.notify_all()
            self._members.sweep_replaced()

    def send_weights_async(self, weights: Any = None, *,
                           collectors: Iterable[int] | None = None) -> int:
        """Snapshot the weights as a new version and start sending it; never blocks
        on a collector.

        Args:
            weights: weights to send instead of the policy's (same layout). Without
                them, the policy's tensors as it holds them now: a module's tensors
                replaced since construction (``load_state_dict(..., assign=True)``, a
                rebound buffer) are found and sent.
            collectors: send to these collector ids only (``None``: all). The new
                version becomes their *current* version; every other collector keeps
                its own and is never sent this one (not when it re-joins either):
                :meth:`wait_ack` then waits for each collector's current version.
                Ids not connected now get it when they join.

        Returns:
            The new version number (one counter for all collectors, so a number
            always names one set of weights).

        Raises:
            ConfigError: ``collectors`` empty, or an id outside
                ``0..max_collectors-1``.
            LayoutMismatchError: ``weights``, or the policy's replaced tensors, differ
                from the layout.
        """
        with self._lock:
            return self._send_weights_async(weights, collectors)

    def _send_weights_async(self, weights: Any, collectors: Iterable[int] | None) -> int:
        self._check_open("send_weights_async")
        to = None if collectors is None else self._collector_ids(collectors)
        if weights is not None:
            leaves = named_leaves(weights)
            BufferLayout.from_tensors(leaves).check_compatible(
                self.layout.to_json(), who="send_weights_async(weights=...)", mine="weights")
            sources = list(leaves.values())
        else:
            sources = self._sources.current()
        self.version += 1
        try:
            self._publisher.publish(sources, self.version, self.links, to)
        except BaseException:
            self.version -= 1  # never published: the next call reuses the number
            raise
        return self.version

    def _collector_ids(self, collectors: Iterable[int]) -> frozenset[int]:
        try:
            ids: list[object] = list(collectors)
        except TypeError:  # e.g. a single int
            ids = [collectors]
        bad = [c for c in ids if not isinstance(c, int) or isinstance(c, bool)
               or not 0 <= c < self.max_collectors]
        if bad or not ids:
            raise ConfigError(f"send_weights_async: collectors must be a non-empty "
                              f"collection of ids in [0, {self.max_collectors}), got "
                              f"{collectors!r}")
        return frozenset(c for c in ids if isinstance(c, int))

    def current_version(self, collector_id: int) -> int:
        """The version collector ``collector_id`` should hold: the newest sent to all
        collectors, or a newer one sent to it with ``collectors=`` (-1: none yet)."""
        return self._publisher.current(collector_id)

    def send_weights(self, weights: Any = None, timeout: float = 60.0, *,
                     collectors: Iterable[int] | None = None) -> AckResult:
        """:meth:`send_weights_async` then :meth:`wait_ack`."""
        self.send_weights_async(weights, collectors=collectors)
        return self.wait_ack(timeout)

    def wait_ack(self, timeout: float = 60.0) -> AckResult:
        """Block until every live collector applied its current version: the newest
        version, or for a collector left out of a ``send_weights_async(collectors=...)``
        the newest one sent to it (:meth:`current_version`).

        Returns:
            The :class:`AckResult` of the newest version (all live collectors hold
            their current version).

        Raises:
            CollectorFailed: a collector's link broke during the wait; raised after the
                others acked (or the timeout), carrying the ``AckResult``. That
                collector is no longer waited for until it joins again.
            WeightSyncTimeout: after ``timeout`` s, naming the lagging collectors and
                carrying the ``AckResult``.
        """
        timeout = check_timeout("WeightSender.wait_ack", timeout)
        with self._lock:
            self._check_open("wait_ack")
            target = self.version
        start = time.monotonic()
        deadline = start + timeout
        newly_failed: dict[int, str] = {}
        failed_pids: dict[int, int | None] = {}
        # The acks the last wait saw. Checked against each link's awaited ack under the
        # lock: another thread may have moved a link on (or the door replaced it) since.
        acked: dict[int, tuple[int, int, int]] = {}
        ack_seen: dict[int, float] = {}  # when each ack was seen (perf_counter)
        while True:
            with self._lock:
                self._check_open("wait_ack")
                for cid, link in self.links.items():
                    link.progress(acked=cid in acked and link.awaited_ack == acked[cid])
                newly_failed.update(self._members.retire_failed(failed_pids))
                lagging = [link for c, link in self.links.items()
                           if link.acked_version < self._publisher.current(c)]
                waiting = {link.collector_id: (link.transport, a) for link in lagging
                           if (a := link.awaited_ack) is not None}
            remaining = deadline - time.monotonic()
            if not lagging or remaining <= 0:
                break
            if not waiting:  # cannot happen after progress(); never spin
                break
            # Slices: between them links are checked for failure, so a dead collector
            # costs a slice, not the whole timeout. Outside the lock: the door admits and
            # other threads send meanwhile.
            try:
                seen = wait_placements(self._waiter(), waiting,
                                       min(remaining, _ACK_SLICE_S), target,
                                       lambda: self._closed)
                acked = {cid: waiting[cid][1] for cid in seen}
                ack_seen.update(seen)
            except WeightSyncTimeout:  # re-check links and the deadline
                acked = {}
        with self._lock:
            return ack_result(self.links, self._publisher, target, self.wire_layout.nbytes,
                              start, newly_failed, failed_pids, ack_seen)

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
        timeout = check_timeout("WeightSender.wait_for", timeout)
        self._check_open("wait_for")
        ids = sorted(set(collector_ids))
        bad = [c for c in ids if not isinstance(c, int) or isinstance(c, bool)
               or not 0 <= c < self.max_collectors]
        if bad:
            raise ConfigError(f"wait_for: collector ids must be in [0, {self.max_collectors}), "
                              f"got {bad!r}")
        start = time.monotonic()
        deadline = start + timeout
        with self._admitted:
            while True:
                self._check_open("wait_for")
                absent = [c for c in ids if c not in self.links]
                if not absent:
                    break
                for c in absent:
                    refusal = self._admissions.refusal(c)
                    if refusal is not None:
                        raise refusal
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise WeightSyncTimeout(
                        f"collector(s) {absent} not connected after "
                        f"{time.monotonic() - start:.2f}s (version {self.version})")
                self._admitted.wait(remaining)  # the door admits meanwhile
        return self.wait_ack(max(deadline - time.monotonic(), 0.001))

    def close(self) -> None:
        """Tell the collectors the stream ended, release links, memory and the offers,
        and stop the store server; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._admitted.notify_all()
        if self._door is not None:
            self._door.close(_CLOSE_GRACE_S)  # outside the lock: its round may need it
        with self._lock:
            self._admissions.close()
            for link in self.links.values():
                link.close()
            live = [(c, link.incarnation) for c, link in self.links.items()
                    if link.failure is None]
        # The store server lives in this process: keep it up until the live collectors
        # read the close (briefly), or a collector would see the store vanish instead.
        if live:
            self._waiter().wait_byes(live, min(_CLOSE_GRACE_S, self.config.timeout))
        with self._lock:
            self.links.clear()
            self._publisher.close()
            self._placements.close()
            self._heartbeat.close()
            self._control.close()
            for client in self._waiter_clients:
                client.close()
        # Collectors normally read the close first (ClosedError); one that reads later
        # sees PeerGone.
        self._server.stop()
