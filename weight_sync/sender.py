"""The learner's side: :class:`WeightSender` keeps N collectors current.

Example::

    sender = WeightSender(policy, num_collectors=3)
    launch_collectors(sender.connection_info)      # hand each process the small info
    sender.connect(timeout=60)                     # rendezvous + layout check + initial sync
    for step in range(steps):
        optimizer.step()
        sender.send_weights_async()                # snapshot + send; returns at once
        ...                                        # keep training
        sender.wait_ack(timeout=10)                # every collector applied it
    sender.close()
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import torch

from weight_sync.config import ConnectionInfo, SenderConfig
from weight_sync.errors import (
    ClosedError,
    CollectorFailed,
    LayoutMismatchError,
    ProtocolError,
    WeightSyncTimeout,
)
from weight_sync.layout import BufferLayout, named_leaves
from weight_sync.metrics import SyncRecord, SyncStats
from weight_sync.protocol import Keys
from weight_sync.snapshots import SnapshotPool
from weight_sync.store import create_server, get_int, wait_keys
from weight_sync.transports.distributed import LEARNER_RANK, DistributedTransport

__all__ = ["WeightSender"]

log = logging.getLogger(__name__)


class WeightSender:
    """Pushes versions of a policy's weights to ``num_collectors`` collectors.

    Args:
        policy: an ``nn.Module``, a TensorDict or a ``state_dict`` whose tensors are
            read (not copied) at every :meth:`send_weights_async`.
        num_collectors: how many collectors :meth:`connect` waits for (ids 0..N-1).
        config: where to listen and how long to wait; keyword arguments override
            its fields (``host``, ``port``, ``name``, ``backend``, ``timeout``).

    Raises:
        InvalidWeightsError: empty or non-tensor weights.
        ConnectionFailed: the store cannot bind its address.
    """

    def __init__(self, policy: Any, num_collectors: int, config: SenderConfig | None = None,
                 **overrides: Any) -> None:
        base = config or SenderConfig()
        self.config = SenderConfig(**{**base.__dict__, **overrides})
        if not isinstance(num_collectors, int) or num_collectors < 1:
            raise ValueError(f"num_collectors must be an int >= 1, got {num_collectors!r}")
        self.num_collectors = num_collectors
        self._policy = policy
        self._sources = list(named_leaves(policy).values())
        self.layout = BufferLayout.from_weights(policy)
        self._keys = Keys(self.config.name)
        self._store = create_server(self.config.host, self.config.port, self.config.timeout)
        self._store.set(self._keys.layout, self.layout.to_json())
        device = torch.device("cuda", torch.cuda.current_device()) \
            if self.config.backend == "nccl" else torch.device("cpu")
        self._pool = SnapshotPool(self.layout, device)
        self.transports: dict[int, DistributedTransport] = {}
        self.version = 0
        self.stats = SyncStats()
        self._send_started: dict[int, float] = {}
        self._connected = False
        self._closed = False

    @property
    def connection_info(self) -> ConnectionInfo:
        """What a collector process needs to connect (picklable)."""
        return ConnectionInfo(
            host=self.config.host, port=int(self._store.port), name=self.config.name,
            layout_digest=self.layout.digest, num_collectors=self.num_collectors,
            backend=self.config.backend, nbytes=self.layout.nbytes,
        )

    def __enter__(self) -> WeightSender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self, what: str) -> None:
        if self._closed:
            raise ClosedError(f"WeightSender.{what}() after close()")

    def connect(self, timeout: float = 60.0) -> None:
        """Wait for every collector, check their layouts, and sync version 0 to all.

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
        for c in ids:
            hello = json.loads(self._store.get(self._keys.hello(c, incs[c])))
            if hello.get("refused"):
                raise LayoutMismatchError(
                    f"collector {c} (pid {hello.get('pid')}) refused the learner's layout:\n  "
                    + "\n  ".join(hello["refused"]), hello["refused"])
        for c in ids:
            link = DistributedTransport(
                self._store, self._keys, c, incs[c], rank=LEARNER_RANK, layout=self.layout,
                backend=self.config.backend, timeout=self.config.timeout)
            link.connect()
            self.transports[c] = link
        self._connected = True
        self._publish(self._sources, self.version)
        self.wait_ack(max(deadline - time.monotonic(), 0.001))
        log.info("connected %d collector(s) on %s:%s, layout %s (%d bytes)",
                 self.num_collectors, self.config.host, self._store.port, self.layout.digest,
                 self.layout.nbytes)

    def _publish(self, sources: list[torch.Tensor], version: int) -> None:
        start = time.perf_counter()
        snap = self._pool.take(sources, version)
        try:
            for link in self.transports.values():
                if link.failure is None:
                    link.send_weights_async(snap)
        finally:
            snap.release()
        self._send_started[version] = start
        self.stats.pack_s = time.perf_counter() - start
        self._store.set(self._keys.version, str(version))

    def send_weights_async(self, weights: Any = None) -> int:
        """Snapshot the weights as a new version and start sending it; never blocks.

        Args:
            weights: weights to send instead of the policy's (same layout).

        Returns:
            The new version number.
        """
        self._check_open("send_weights_async")
        if not self._connected:
            raise ProtocolError("send_weights_async() before connect()")
        sources = self._sources
        if weights is not None:
            leaves = named_leaves(weights)
            BufferLayout.from_tensors(leaves).check_compatible(
                self.layout.to_json(), who="send_weights_async(weights=...)")
            sources = list(leaves.values())
        self.version += 1
        self._publish(sources, self.version)
        return self.version

    def send_weights(self, weights: Any = None, timeout: float = 60.0) -> int:
        """:meth:`send_weights_async` then :meth:`wait_ack`."""
        version = self.send_weights_async(weights)
        self.wait_ack(timeout)
        return version

    def wait_ack(self, timeout: float = 60.0) -> None:
        """Block until every collector applied the newest version.

        Raises:
            WeightSyncTimeout: after ``timeout`` s, naming the collectors that lag.
            CollectorFailed: a collector's link broke (the others keep being served).
        """
        self._check_open("wait_ack")
        if not self._connected:
            raise ProtocolError("wait_ack() before connect()")
        start = time.monotonic()
        deadline = start + timeout
        target = self.version
        while True:
            for link in self.transports.values():
                link.progress()
            failed = [c for c, link in self.transports.items() if link.failure is not None]
            if failed:
                first = self.transports[failed[0]].failure
                raise CollectorFailed(f"collector(s) {failed} failed: {first}", failed[0])
            lagging = {c: link for c, link in self.transports.items()
                       if link.acked_version < target}
            if not lagging:
                break
            keys = [k for link in lagging.values() if (k := link.waiting_key) is not None]
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not keys:
                self._raise_lagging(lagging, target, start)
            try:
                wait_keys(self._store, keys, remaining, f"acks of version {target}")
            except WeightSyncTimeout:
                for link in lagging.values():
                    link.progress()
                self._raise_lagging({c: link for c, link in lagging.items()
                                     if link.acked_version < target}, target, start)
        started = self._send_started.pop(target, None)
        for v in [v for v in self._send_started if v < target]:
            del self._send_started[v]
        if started is not None:
            self.stats.add(SyncRecord(target, self.layout.nbytes, len(self.transports),
                                      self.stats.pack_s, time.perf_counter() - started))

    def _raise_lagging(self, lagging: dict[int, DistributedTransport], target: int,
                       start: float) -> None:
        detail = ", ".join(f"{c} (acked {link.acked_version})" for c, link in lagging.items())
        raise WeightSyncTimeout(
            f"version {target} not acked after {time.monotonic() - start:.2f}s by "
            f"collector(s) {detail}")

    def close(self) -> None:
        """Tell the collectors the stream ended and release links and the store."""
        if self._closed:
            return
        self._closed = True
        for link in self.transports.values():
            link.close()
        self.transports.clear()
        # The store server stops with its last reference; collectors then see PeerGone.
        self._store = None  # type: ignore[assignment]
