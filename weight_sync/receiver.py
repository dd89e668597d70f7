"""The collector's side: :class:`WeightReceiver` keeps one policy current.

A background thread waits for the learner's next message and receives it into a
staging buffer while the collector keeps stepping its environment; a poll between
steps then applies it in one step by pointing the policy's tensors at the staging
buffer (no copy), so the policy is never half old, half new.

Example::

    receiver = WeightReceiver(policy, info, collector_id=i)
    receiver.connect(timeout=60)          # returns once policy holds the learner's weights
    while running:
        receiver.receive_weights(timeout=0)   # None, or the version just applied
        step_env(policy)
    receiver.close()
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from typing import Any

import torch
import torch.distributed as dist

from weight_sync.config import ConnectionInfo, ReceiverConfig
from weight_sync.errors import (
    ClosedError,
    ConfigError,
    DuplicateCollectorError,
    LayoutMismatchError,
    PeerGone,
    ProtocolError,
    WeightSyncError,
    WeightSyncTimeout,
)
from weight_sync.layout import BufferLayout, named_leaves
from weight_sync.packing import copy_in, swap_in
from weight_sync.protocol import ADMITTED, ADMITTED_SHM, Keys
from weight_sync.store import connect_client, wait_keys
from weight_sync.transports.pair import address_towards
from weight_sync.transports.receiver_link import ReceiverLink

__all__ = ["WeightReceiver"]

log = logging.getLogger(__name__)


class WeightReceiver:
    """Receives versions of the learner's weights into ``policy``.

    Args:
        policy: the collector's ``nn.Module``, TensorDict or ``state_dict``; its
            tensors are updated in place (same objects, new values).
        info: the learner's :attr:`WeightSender.connection_info`.
        collector_id: this collector's id, ``0 <= id < info.num_collectors``.
        config: waits; keyword arguments override its fields (``timeout``...).
    """

    def __init__(self, policy: Any, info: ConnectionInfo, collector_id: int,
                 config: ReceiverConfig | None = None, **overrides: Any) -> None:
        base = config or ReceiverConfig()
        self.config = ReceiverConfig(**{**base.__dict__, **overrides})
        if not isinstance(info, ConnectionInfo):
            raise ConfigError(f"info must be a ConnectionInfo, got {type(info)!r}")
        if not isinstance(collector_id, int) or not 0 <= collector_id < info.max_collectors:
            raise ConfigError(f"collector_id must be an int in [0, {info.max_collectors}), "
                              f"got {collector_id!r}")
        self.info = info
        self.collector_id = collector_id
        self._targets = list(named_leaves(policy).values())
        self.layout = BufferLayout.from_weights(policy)
        self._keys = Keys(info.name)
        self.version = -1
        self.last_apply_s = 0.0
        self._link: ReceiverLink | None = None
        self._active: torch.Tensor | None = None
        self._staging: torch.Tensor | None = None
        self._views: dict[int, list[torch.Tensor]] = {}
        self._shared_memory = False  # the learner's choice, told at admission
        self._can_swap = True
        self._ready: int | None = None
        self._error: WeightSyncError | None = None
        self._cond = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._beating = threading.Event()  # set = stop beating
        self._beater: threading.Thread | None = None
        self._closed = False

    def __enter__(self) -> WeightReceiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _who(self) -> str:
        return f"collector {self.collector_id}"

    def connect(self, timeout: float = 60.0) -> int:
        """Join the learner, check layouts, and apply the initial weights.

        Returns:
            The version applied (the learner's current version).

        Raises:
            ConnectionFailed: no store at ``info.host:info.port`` within ``timeout``.
            LayoutMismatchError: this policy differs from the learner's (listed).
            WeightSyncTimeout: the learner did not complete the sync in time.
        """
        if self._closed:
            raise ClosedError(f"{self._who()}: connect() after close()")
        deadline = time.monotonic() + timeout
        info = self.info
        store = connect_client(info.host, info.port, timeout)
        listener = connect_client(info.host, info.port, max(deadline - time.monotonic(), 0.1))
        inc = int(store.add(self._keys.join(self.collector_id), 1))
        store.add(self._keys.joins, 1)
        wait_keys(store, [self._keys.layout], deadline - time.monotonic(), "the learner's layout")
        diffs = self.layout.differences(store.get(self._keys.layout).decode())
        hello = {"pid": os.getpid(), "host": socket.gethostname(), "digest": self.layout.digest,
                 "refused": diffs or None}
        store.set(self._keys.hello(self.collector_id, inc), json.dumps(hello))
        if diffs:
            raise LayoutMismatchError(
                f"{self._who()}: weights differ from the learner's in {len(diffs)} place(s):\n  "
                + "\n  ".join(diffs), diffs)
        admit = self._keys.admit(self.collector_id, inc)
        wait_keys(store, [admit], deadline - time.monotonic(),
                  f"the learner to admit {self._who()} (incarnation {inc})")
        verdict = store.get(admit).decode()
        if verdict not in (ADMITTED, ADMITTED_SHM):
            raise DuplicateCollectorError(f"{self._who()}: the learner refused it: {verdict}")
        self._shared_memory = verdict == ADMITTED_SHM
        self._start_heartbeat(self._keys.alive(self.collector_id, inc),
                              max(deadline - time.monotonic(), 0.1))
        try:
            version = self._initial_sync(listener, store, inc, deadline)
        except BaseException:
            self._beating.set()
            raise
        self._thread = threading.Thread(
            target=self._listen, name=f"weight-sync-rx-{self.collector_id}", daemon=True)
        self._thread.start()
        log.info("%s connected (incarnation %d), version %d", self._who(), inc, version)
        return version

    def _initial_sync(self, listener: dist.Store, store: dist.Store, inc: int,
                      deadline: float) -> int:
        """Build the link, receive the first message and apply it; its version."""
        info = self.info
        link = ReceiverLink(
            listener, self._keys, self.collector_id, inc, layout=self.layout,
            backend=info.backend, timeout=self.config.timeout,
            bind_host=address_towards(info.host, info.port), ack_store=store,
            shared_memory=self._shared_memory)
        link.connect(timeout=deadline - time.monotonic())
        self._link = link
        self._active = torch.empty(self.layout.nbytes, dtype=torch.uint8, device=link.device)
        self._staging = torch.empty_like(self._active)
        # Per-leaf views of both buffers, made once: a 300-leaf policy's views cost
        # more to build than a small message costs to receive.
        self._views = {id(b): self.layout.views(b) for b in (self._active, self._staging)}
        self._can_swap = all(t.device == link.device for t in self._targets)
        version = link.receive_weights(max(deadline - time.monotonic(), 0.001),
                                       weights=self._active)
        if version is None:
            raise WeightSyncTimeout(f"{self._who()}: no initial weights from the learner "
                                    f"in time")
        self._apply(self._active)
        self.version = version
        link.ack(version)
        return version

    def _start_heartbeat(self, key: str, timeout: float) -> None:
        """Beat every ``info.heartbeat_s`` from a thread with its own store client, so
        the learner can tell a live but slow collector from a vanished one."""
        store = connect_client(self.info.host, self.info.port, timeout)
        store.add(key, 1)

        def beat() -> None:
            while not self._beating.wait(self.info.heartbeat_s):
                try:
                    store.add(key, 1)
                except (dist.DistError, RuntimeError) as exc:
                    # The learner's store is gone. The listener may be stuck in a
                    # transfer the dead learner cut short (gloo only notices at its
                    # timeout): report it now instead.
                    self._fail(PeerGone(f"{self._who()}: the learner's store went away "
                                        f"(heartbeat failed): {exc}"))
                    return

        self._beater = threading.Thread(
            target=beat, name=f"weight-sync-beat-{self.collector_id}", daemon=True)
        self._beater.start()

    def _apply(self, buffer: torch.Tensor) -> None:
        start = time.perf_counter()
        views = self._views[id(buffer)]
        if self._can_swap:
            swap_in(self._targets, views)
            # The policy now lives in `buffer`; the other buffer is free for the next one.
            if buffer is self._staging:
                self._active, self._staging = self._staging, self._active
        else:
            copy_in(self._targets, views)
        self.last_apply_s = time.perf_counter() - start

    def _listen(self) -> None:
        """Background: receive each next message into staging, then wait for the apply."""
        link = self._link
        assert link is not None
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._ready is None or self._stop)
                if self._stop:
                    return
                staging = self._staging
            try:
                version = link.receive_weights(self.config.idle_slice, weights=staging)
            except WeightSyncError as exc:
                self._beating.set()  # the stream ended: beating into a dead store is noise
                self._fail(exc)
                return
            if version is not None:
                with self._cond:
                    self._ready = version
                    self._cond.notify_all()
                link.collect_garbage()  # while the collector applies

    def _fail(self, exc: WeightSyncError) -> None:
        """Record why the stream ended (the first reason wins) and wake the waiters."""
        with self._cond:
            if self._error is None:
                self._error = exc
            self._cond.notify_all()

    def receive_weights(self, timeout: float | None = 0) -> int | None:
        """Apply the newest received weights, if any.

        Args:
            timeout: ``0`` polls and never blocks; ``> 0`` waits up to that long for
                new weights; ``None`` waits up to ``config.timeout`` and raises.

        Returns:
            The version just applied, or ``None`` if nothing new arrived.

        Raises:
            ClosedError: the learner closed the stream, or this receiver is closed.
            PeerGone: the learner died.
            ProtocolError: an out-of-order or repeated version (nothing applied).
        """
        if self._closed:
            raise ClosedError(f"{self._who()}: receive_weights() after close()")
        if self._link is None:
            raise ProtocolError(f"{self._who()}: receive_weights() before connect()")
        with self._cond:
            if self._ready is None and self._error is None and timeout != 0:
                wait = self.config.timeout if timeout is None else timeout
                arrived = self._cond.wait_for(
                    lambda: self._ready is not None or self._error is not None, wait)
                if not arrived and timeout is None:
                    raise WeightSyncTimeout(f"{self._who()}: no new weights after "
                                            f"version {self.version} within {wait:.2f}s")
            if self._ready is None:
                if self._error is not None:
                    raise self._error
                return None
            version = self._ready
            if version <= self.version:
                self._error = ProtocolError(f"{self._who()}: received version {version} "
                                            f"after {self.version}; refused, nothing applied")
                raise self._error
            assert self._staging is not None
            self._apply(self._staging)
            self._ready = None
            self._cond.notify_all()
        self.version = version
        self._link.ack(version)
        return version

    def close(self) -> None:
        """Stop the background thread and release the link; idempotent."""
        if self._closed:
            return
        self._closed = True
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._beating.set()
        if self._link is not None:
            self._link.close()  # wakes the listener's wait for the next message
        if self._beater is not None:
            self._beater.join(self.config.timeout)
        if self._thread is not None:
            # After the learner's death the listener may sit in a cut-short transfer
            # until gloo's timeout; it is a daemon thread, so do not wait for it.
            self._thread.join(1.0 if self._error is not None else self.config.timeout)
            if self._thread.is_alive():
                log.warning("%s: listener thread still busy after close", self._who())
