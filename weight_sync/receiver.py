"""The collector's side: :class:`WeightReceiver` keeps one policy current.

A background thread waits for the learner's next message and receives it into a
staging buffer while the collector keeps stepping its environment; a poll between
steps then applies it in one step by pointing the policy's tensors at the staging
buffer (no copy), so the policy is never half old, half new.

The hand-off is one queue: the background thread puts each received version (or the
error that ended the stream) into it and waits until the collector applied it, so it
never overwrites a buffer the collector may still be switching to. Any exception in a
background thread becomes the stream's error, raised by the next ``receive_weights``.

Example::

    receiver = WeightReceiver(policy, info, collector_id=i)
    receiver.connect(timeout=60)          # returns once policy holds the learner's weights
    while running:
        receiver.receive_weights(timeout=0)   # None, or the version just applied
        step_env(policy)
    receiver.close()
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any

import torch

from weight_sync.auth import resolve_secret
from weight_sync.config import ConnectionInfo, ReceiverConfig, wire_dtype
from weight_sync.control import Control
from weight_sync.errors import (
    ClosedError,
    ConfigError,
    PeerGone,
    ProtocolError,
    WeightSyncError,
    WeightSyncTimeout,
)
from weight_sync.handshake import join
from weight_sync.hooks import ReceiverHooks
from weight_sync.layout import BufferLayout, named_leaves
from weight_sync.liveness import LearnerWatch
from weight_sync.packing import copy_in, swap_in
from weight_sync.receiver_link import ReceiverLink
from weight_sync.transports.base import LinkSpec
from weight_sync.transports.pair import address_towards
from weight_sync.transports.registry import get_transport

__all__ = ["WeightReceiver"]

log = logging.getLogger(__name__)

# close() waits this long for the background threads, before and after it closes the
# transport end.
_CLOSE_JOIN_S = 1.0



class WeightReceiver:
    """Receives versions of the learner's weights into ``policy``.

    Args:
        policy: the collector's ``nn.Module``, TensorDict or ``state_dict``; its
            tensors are updated in place (same objects, new values).
        info: the learner's :attr:`WeightSender.connection_info`.
        collector_id: this collector's id, ``0 <= id < info.max_collectors``.
        config: waits; keyword arguments override its fields (``timeout``...).
        hooks: callbacks on the receive path (fault injection, instrumentation).
    """

    def __init__(self, policy: Any, info: ConnectionInfo, collector_id: int,
                 config: ReceiverConfig | None = None, *, hooks: ReceiverHooks | None = None,
                 **overrides: Any) -> None:
        base = config or ReceiverConfig()
        self.config = ReceiverConfig(**{**base.__dict__, **overrides})
        if not isinstance(info, ConnectionInfo):
            raise ConfigError(f"info must be a ConnectionInfo, got {type(info)!r}")
        if not isinstance(collector_id, int) or not 0 <= collector_id < info.max_collectors:
            raise ConfigError(f"collector_id must be an int in [0, {info.max_collectors}), "
                              f"got {collector_id!r}")
        self.info = info
        self.collector_id = collector_id
        self._hooks = hooks
        self._targets = list(named_leaves(policy).values())
        self.layout = BufferLayout.from_weights(policy)
        self.wire_layout = self.layout.on_wire(wire_dtype(info.wire_dtype))
        """The layout of each message (``layout`` unless the learner narrows floats)."""
        self.version = -1
        self.transport = ""
        """The transport the learner chose for this collector (set by :meth:`connect`)."""
        self._link: ReceiverLink | None = None
        self._device = torch.device("cpu")
        self._private: list[torch.Tensor] = []  # buffers a copying transport fills
        self._active: torch.Tensor | None = None  # the message the policy points at
        self._held: torch.Tensor | None = None  # the message last applied (swapped or copied)
        self._ready: torch.Tensor | None = None  # received, handed over, not applied yet
        self._views: dict[int, list[torch.Tensor]] = {}  # data_ptr -> per-leaf views
        self._can_swap = True
        self._inbox: queue.SimpleQueue[int | WeightSyncError] = queue.SimpleQueue()
        self._applied = threading.Event()  # staging may be refilled
        self._error: WeightSyncError | None = None  # the stream's end, once raised
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._closed = False
        self._secret = resolve_secret(self.config.secret, "ReceiverConfig")
        if self.config.learner_timeout <= info.heartbeat_s:
            raise ConfigError(f"ReceiverConfig.learner_timeout must exceed the learner's "
                              f"beat interval ({info.heartbeat_s}s), got "
                              f"{self.config.learner_timeout!r}")
        self._watch = LearnerWatch(self._who(), self.config.learner_timeout)
        self._learner_lost = False  # frozen or gone: close() makes no store call

    def __enter__(self) -> WeightReceiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _who(self) -> str:
        return f"collector {self.collector_id}"

    @property
    def refused(self) -> int:
        """Messages refused so far as corrupted in transit (each asked for again;
        none of them applied)."""
        return 0 if self._link is None else self._link.refused

    def _control(self, timeout: float) -> Control:
        return Control.connect(self.info.host, self.info.port, self.info.name,
                               max(timeout, 0.1))

    def connect(self, timeout: float = 60.0) -> int:
        """Join the learner, check layouts, and apply the initial weights.

        Returns:
            The version applied (the learner's current version).

        Raises:
            ConnectionFailed: no store at ``info.host:info.port`` within ``timeout``.
            LayoutMismatchError: this policy differs from the learner's (listed).
            DuplicateCollectorError: a live process already serves this id.
            AuthenticationError: with a shared secret on either side, the other side
                could not prove it knows it.
            WeightSyncTimeout: the learner did not complete the sync in time.
        """
        if self._closed:
            raise ClosedError(f"{self._who()}: connect() after close()")
        deadline = time.monotonic() + timeout
        # One client per thread: this one (acks), the listener's, the heartbeat's.
        control = self._control(timeout)
        inc, verdict, key = join(control, self.layout, self.collector_id, deadline,
                                 self._secret)
        self.transport = verdict.transport
        spec = LinkSpec(self.collector_id, inc, self.wire_layout, backend=self.info.backend,
                        timeout=self.config.timeout,
                        bind_host=address_towards(self.info.host, self.info.port),
                        progress=None if self._hooks is None else self._hooks.during_receive)
        self._start_thread(self._heartbeat, (self._control(deadline - time.monotonic()), inc),
                           "beat")
        try:
            transport = get_transport(verdict.transport)
            link = ReceiverLink(spec, transport.receiver(spec),
                                self._control(deadline - time.monotonic()), control,
                                self._hooks, lends=transport.lends, key=key)
            self._link = link
            link.connect(deadline - time.monotonic())
            version = self._initial_sync(link, spec, deadline)
        except BaseException:
            self.close()
            raise
        self._start_thread(self._watch_learner, self._watch, "watch")
        self._start_thread(self._listen, link, "rx")
        log.info("%s connected (incarnation %d) over %r, version %d", self._who(), inc,
                 verdict.transport, version)
        return version

    def _initial_sync(self, link: ReceiverLink, spec: LinkSpec, deadline: float) -> int:
        """Receive the first message, apply it and ack it; its version."""
        self._device = spec.device
        # Swapping needs messages in the policy's own dtypes, on its device; otherwise
        # each message is copied in (and widened, with a wire dtype).
        self._can_swap = self.wire_layout == self.layout and all(
            t.device == spec.device for t in self._targets)
        message = None
        while message is None and (left := deadline - time.monotonic()) > 0:
            message = link.receive(self._staging(), left)  # None: refused, asked again
        if message is None:
            raise WeightSyncTimeout(f"{self._who()}: no initial weights from the learner "
                                    f"in time")
        version, data = message
        self._apply(data)
        self.version = version
        link.ack(version)
        return version

    def _staging(self) -> torch.Tensor | None:
        """The private buffer the next message goes into (``None`` when the transport
        lends its messages): one the policy does not point at, made on first use."""
        if self._link is None or self._link.lends:
            return None
        free = [b for b in self._private if b is not self._active]
        if free:
            return free[0]
        buffer = torch.empty(self.wire_layout.nbytes, dtype=torch.uint8, device=self._device)
        self._private.append(buffer)
        return buffer

    def _views_of(self, data: torch.Tensor) -> list[torch.Tensor]:
        # Per-leaf views made once per buffer or segment (both are few and reused): a
        # 300-leaf policy's views cost more to build than a small message to receive.
        key = data.data_ptr()
        views = self._views.get(key)
        if views is None:
            views = self._views[key] = self.wire_layout.views(data)
        return views

    def _apply(self, data: torch.Tensor) -> None:
        """Switch the policy to ``data`` in one step (or copy it in, when the policy's
        tensors live on another device than the messages)."""
        views = self._views_of(data)
        if self._can_swap:
            swap_in(self._targets, views)
            self._active = data
        else:
            copy_in(self._targets, views)
        self._held = data

    def _keep_private(self) -> None:
        """Move the policy off a lent message (the learner's memory) onto a private
        copy, so it stays valid once the link is gone."""
        active = self._active
        if active is None or any(active is b for b in self._private):
            return
        own = active.clone()
        self._private = [own]
        self._views.clear()
        self._apply(own)

    def _start_thread(self, body: Any, arg: Any, role: str) -> None:
        def run() -> None:
            try:
                body(arg)
            except BaseException as exc:  # any failure ends the stream, never silently
                if not isinstance(exc, WeightSyncError):
                    log.exception("%s: %s thread failed", self._who(), role)
                    wrapped = WeightSyncError(f"{self._who()}: the background {role} thread "
                                              f"failed: {exc!r}")
                    wrapped.__cause__ = exc
                    exc = wrapped
                self._stop.set()
                self._inbox.put(exc)

        thread = threading.Thread(target=run, name=f"weight-sync-{role}-{self.collector_id}",
                                  daemon=True)
        self._threads.append(thread)
        thread.start()

    def _heartbeat(self, beat: tuple[Control, int]) -> None:
        """Beat now and every ``info.heartbeat_s``, so the learner can tell a live but
        slow collector from a vanished one; read the learner's beat meanwhile."""
        control, inc = beat
        while True:
            try:
                control.beat(self.collector_id, inc)
                self._watch.saw(control.learner_beats())
            except PeerGone as exc:
                # The listener may be stuck in a transfer the dead learner cut short
                # (gloo only notices at its timeout): report it now instead.
                self._learner_lost = True
                raise PeerGone(f"{self._who()}: the learner's store went away "
                               f"(heartbeat failed): {exc}") from exc
            if self._stop.wait(self.info.heartbeat_s):
                return

    def _watch_learner(self, watch: LearnerWatch) -> None:
        """Every beat interval, check the learner's beat moved lately; this thread
        makes no store call, so a frozen learner cannot hold it up."""
        while not self._stop.wait(self.info.heartbeat_s):
            try:
                watch.check()
            except PeerGone:
                self._learner_lost = True
                raise

    def _listen(self, link: ReceiverLink) -> None:
        """Receive each next message, hand it over, wait for its apply."""
        while not self._stop.is_set():
            message = link.receive(self._staging(), self.config.idle_slice, self._held)
            if message is None:
                continue
            version, self._ready = message
            del message  # no reference of this thread may outlive the apply
            self._applied.clear()
            self._inbox.put(version)
            link.collect_garbage()  # while the collector applies
            while not self._applied.wait(self.config.idle_slice):
                if self._stop.is_set():
                    return

    def receive_weights(self, timeout: float | None = 0) -> int | None:
        """Apply the newest received weights, if any.

        Args:
            timeout: ``0`` polls and never blocks; ``> 0`` waits up to that long for
                new weights; ``None`` waits up to ``config.timeout`` and raises.

        Returns:
            The version just applied, or ``None`` if nothing new arrived.

        Raises:
            ClosedError: the learner closed the stream, or this receiver is closed.
            PeerGone: the learner died, or gave no sign of life for
                ``config.learner_timeout`` s (frozen, cut off).
            AuthenticationError: with a secret, a forged or replayed signal (nothing
                applied).
            IntegrityError: messages kept arriving corrupted (nothing applied).
            ProtocolError: an out-of-order or repeated version (nothing applied).
            WeightSyncError: whatever ended the background receive, as it ended it.
        """
        if self._closed:
            raise ClosedError(f"{self._who()}: receive_weights() after close()")
        if self._link is None:
            raise ProtocolError(f"{self._who()}: receive_weights() before connect()")
        if self._error is not None:
            raise self._error
        wait = self.config.timeout if timeout is None else timeout
        try:
            item = self._inbox.get(block=wait > 0, timeout=wait if wait > 0 else None)
        except queue.Empty:
            if timeout is None:
                raise WeightSyncTimeout(f"{self._who()}: no new weights after version "
                                        f"{self.version} within {wait:.2f}s") from None
            return None
        if isinstance(item, WeightSyncError):
            self._error = item
            raise item
        if item <= self.version:
            self._error = ProtocolError(f"{self._who()}: received version {item} after "
                                        f"{self.version}; refused, nothing applied")
            raise self._error
        ready, self._ready = self._ready, None
        assert ready is not None
        self._apply(ready)
        del ready
        self.version = item
        self._applied.set()
        self._link.ack(item)
        return item

    def close(self) -> None:
        """Stop the background threads and release the link; idempotent. The policy
        keeps the last applied weights (in its own memory, also after a zero-copy
        transport)."""
        if self._closed:
            return
        self._closed = True
        self._keep_private()
        self._ready = None
        self._stop.set()
        self._applied.set()
        reach = not self._learner_lost
        if self._link is not None:
            self._link.stop(reach_learner=reach)  # wakes the listener's wait
        # A listener inside a transfer (one the learner cut short, or will never finish
        # now that this collector left) is woken by closing the transport end; daemon
        # threads, so the waits stay short.
        self._join_threads(_CLOSE_JOIN_S)
        self._views.clear()
        if self._link is not None:
            self._link.close(reach_learner=reach)
        self._join_threads(_CLOSE_JOIN_S)
        for thread in self._threads:
            if thread.is_alive():
                log.warning("%s: %s still busy after close", self._who(), thread.name)

    def _join_threads(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(deadline - time.monotonic(), 0))
