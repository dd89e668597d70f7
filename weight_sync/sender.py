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

import contextlib
import logging
import socket
import time
from typing import Any

import torch

from weight_sync.admission import Admissions
from weight_sync.config import ConnectionInfo, SenderConfig
from weight_sync.errors import (
    ClosedError,
    ConfigError,
    LayoutMismatchError,
    ProtocolError,
    WeightSyncError,
    WeightSyncTimeout,
)
from weight_sync.layout import BufferLayout, named_leaves
from weight_sync.metrics import AckResult, SyncRecord, SyncStats
from weight_sync.protocol import Keys
from weight_sync.snapshots import Snapshot, SnapshotPool
from weight_sync.store import WILDCARDS, create_server, get_int, wait_keys
from weight_sync.transports.sender_link import SenderLink

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

    Raises:
        InvalidWeightsError: empty or non-tensor weights.
        ConnectionFailed: the store cannot bind its address.
    """

    def __init__(self, policy: Any, num_collectors: int, config: SenderConfig | None = None,
                 *, max_collectors: int | None = None, **overrides: Any) -> None:
        base = config or SenderConfig()
        self.config = SenderConfig(**{**base.__dict__, **overrides})
        if not isinstance(num_collectors, int) or num_collectors < 1:
            raise ConfigError(f"num_collectors must be an int >= 1, got {num_collectors!r}")
        max_collectors = num_collectors if max_collectors is None else max_collectors
        if not isinstance(max_collectors, int) or max_collectors < num_collectors:
            raise ConfigError(f"max_collectors must be an int >= num_collectors "
                              f"({num_collectors}), got {max_collectors!r}")
        self.num_collectors = num_collectors
        self.max_collectors = max_collectors
        self._sources = list(named_leaves(policy).values())
        self.layout = BufferLayout.from_weights(policy)
        self._keys = Keys(self.config.name)
        self._store = create_server(self.config.host, self.config.port, self.config.timeout)
        self._store.set(self._keys.layout, self.layout.to_json())
        self._store.set(self._keys.info, self.connection_info.to_json())
        device = torch.device("cuda", torch.cuda.current_device()) \
            if self.config.backend == "nccl" else torch.device("cpu")
        self._pool = SnapshotPool(self.layout, device, shared=self.config.transport == "shm")
        self._latest: Snapshot | None = None
        self.transports: dict[int, SenderLink] = {}
        self.failed: dict[int, str] = {}
        """Collectors whose link broke (id -> reason), until they join again."""
        self._admissions = Admissions(
            self._store, self._keys, self._make_link, max_collectors,
            (WILDCARDS.get(self.config.host, self.config.host), int(self._store.port)),
            self.config.timeout)
        self._joins_read = 0.0  # when joins were last looked for
        self.version = 0
        self.stats = SyncStats()
        self._send_started: dict[int, float] = {}
        self._connected = False
        self._closed = False

    @property
    def connection_info(self) -> ConnectionInfo:
        """What a collector process needs to connect (picklable)."""
        host = self.config.host
        return ConnectionInfo(
            # A wildcard address binds every interface; collectors dial the host's name.
            host=socket.gethostname() if host in WILDCARDS else host,
            port=int(self._store.port), name=self.config.name,
            layout_digest=self.layout.digest, num_collectors=self.num_collectors,
            backend=self.config.backend, nbytes=self.layout.nbytes,
            max_collectors=self.max_collectors,
            heartbeat_s=self.config.liveness_timeout / 10,
        )

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
        """
        self._check_open("connect")
        deadline = time.monotonic() + timeout
        ids = range(self.num_collectors)
        wait_keys(self._store, [self._keys.join(c) for c in ids], timeout,
                  f"collectors {list(ids)} to join")
        incs = {c: get_int(self._store, self._keys.join(c)) for c in ids}
        wait_keys(self._store, [self._keys.hello(c, incs[c]) for c in ids],
                  deadline - time.monotonic(), "collectors to finish their handshake")
        hellos = {c: self._admissions.hello(c, incs[c]) for c in ids}
        for c, hello in hellos.items():
            if hello.get("refused"):
                raise LayoutMismatchError(
                    f"collector {c} (pid {hello.get('pid')}) refused the learner's layout:\n  "
                    + "\n  ".join(hello["refused"]), hello["refused"])
        for c in ids:
            self.transports[c] = self._admissions.admit_now(
                c, incs[c], hellos[c], deadline - time.monotonic())
        self._connected = True
        self._publish(self._sources, self.version)
        self.wait_ack(max(deadline - time.monotonic(), 0.001))
        log.info("connected %d collector(s) on %s:%s, layout %s (%d bytes)",
                 self.num_collectors, self.config.host, self._store.port, self.layout.digest,
                 self.layout.nbytes)

    def _make_link(self, cid: int, inc: int, hello: dict[str, Any]) -> SenderLink:
        host = self.config.host
        local = hello.get("host") == socket.gethostname()
        link = SenderLink(
            self._store, self._keys, cid, inc, layout=self.layout,
            backend=self.config.backend, timeout=self.config.timeout,
            bind_host=None if host in WILDCARDS else host,
            liveness_timeout=self.config.liveness_timeout,
            shared_memory=local and self.config.transport == "shm")
        if local:
            link.peer_pid = int(hello["pid"])
        return link

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
        ready, failed = self._admissions.poll(self.transports)
        self.failed.update(failed)
        for link in ready:
            old = self.transports.pop(link.collector_id, None)
            if old is not None:
                old.close()
            self.transports[link.collector_id] = link
            self.failed.pop(link.collector_id, None)
            log.info("collector %d (incarnation %d) joined at version %d",
                     link.collector_id, link.incarnation, self.version)
            if self._latest is not None:
                link.send_weights_async(self._latest)

    def _publish(self, sources: list[torch.Tensor], version: int) -> None:
        start = time.perf_counter()
        snap = self._pool.take(sources, version)
        if self._latest is not None:
            self._latest.release()
        self._latest = snap  # kept so a collector that (re)joins gets exactly this version
        for link in self.transports.values():
            if link.failure is None:  # a broken link is reported and retired by wait_ack
                link.send_weights_async(snap)
        self._send_started[version] = start
        self.stats.pack_s = time.perf_counter() - start

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
        self._publish(sources, self.version)
        return self.version

    def send_weights(self, weights: Any = None, timeout: float = 60.0) -> AckResult:
        """:meth:`send_weights_async` then :meth:`wait_ack`."""
        self.send_weights_async(weights)
        return self.wait_ack(timeout)

    def _retire_failed(self, pids: dict[int, int | None]) -> dict[int, str]:
        """Drop the broken links; their reasons by id (their pids go into ``pids``)."""
        newly = {c: str(link.failure) for c, link in self.transports.items()
                 if link.failure is not None}
        for c in newly:
            link = self.transports.pop(c)
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
        acked: set[int] = set()  # links whose awaited ack key the last wait saw
        admit = True
        while True:
            if admit:
                self._admit_joins()
            for cid, link in self.transports.items():
                link.progress(acked=cid in acked)
            newly_failed.update(self._retire_failed(failed_pids))
            lagging = [link for link in self.transports.values() if link.acked_version < target]
            remaining = deadline - time.monotonic()
            if not lagging or remaining <= 0:
                break
            waiting = {link.collector_id: k for link in lagging
                       if (k := link.waiting_key) is not None}
            if not waiting:  # cannot happen after progress(); never spin
                break
            # Slices: between them links are checked for failure, so a dead collector
            # costs a slice, not the whole timeout.
            try:
                wait_keys(self._store, list(waiting.values()), min(remaining, _ACK_SLICE_S),
                          f"acks of version {target}")
                acked, admit = set(waiting), False
            except WeightSyncTimeout:  # re-check links, joins and the deadline
                acked, admit = set(), True
        acked_versions = {c: link.acked_version for c, link in self.transports.items()}
        result = AckResult.of(target, acked_versions, newly_failed)
        result.raise_if_incomplete(time.monotonic() - start, failed_pids, acked_versions)
        self._record(target)
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
            absent = [c for c in ids if c not in self.transports]
            if not absent:
                return self.wait_ack(max(deadline - time.monotonic(), 0.001))
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WeightSyncTimeout(
                    f"collector(s) {absent} not connected after {time.monotonic() - start:.2f}s"
                    f" (version {self.version})")
            connecting = [c for c in absent if c in self._admissions.connecting]
            if connecting:
                self._admissions.wait(connecting, min(remaining, _ACK_SLICE_S))
                continue
            # The next incarnation's handshake key appears when it is ready to admit; the
            # store waits for all keys, so with several absent ids the slice bounds the
            # wait before the ones that did arrive are admitted.
            keys = [self._keys.hello(c, self._admissions.seen.get(c, 0) + 1) for c in absent]
            with contextlib.suppress(WeightSyncTimeout):
                wait_keys(self._store, keys, min(remaining, _ACK_SLICE_S),
                          f"collectors {absent} to join")

    def _record(self, target: int) -> None:
        started = self._send_started.pop(target, None)
        for v in [v for v in self._send_started if v < target]:
            del self._send_started[v]
        if started is not None:
            self.stats.add(SyncRecord(target, self.layout.nbytes, len(self.transports),
                                      self.stats.pack_s, time.perf_counter() - started))

    def close(self) -> None:
        """Tell the collectors the stream ended and release links and the store."""
        if self._closed:
            return
        self._closed = True
        self._admissions.close()
        for link in self.transports.values():
            link.close()
        # The store server lives in this process: keep it up until the live collectors
        # read the close (briefly), or a collector would see the store vanish instead.
        byes = [self._keys.bye(c, link.incarnation) for c, link in self.transports.items()
                if link.failure is None]
        if byes:
            with contextlib.suppress(WeightSyncError):
                wait_keys(self._store, byes, min(_CLOSE_GRACE_S, self.config.timeout),
                          "collectors to read the close")
        self.transports.clear()
        if self._latest is not None:
            self._latest.release()
            self._latest = None
        self._pool.close()
        # The store server stops with its last reference. Collectors normally read the
        # CLOSED signal first (ClosedError); one that reads later sees PeerGone.
        self._store = None  # type: ignore[assignment]
