"""The collector's side: :class:`WeightReceiver` keeps one policy current.

A background thread waits for the learner's next message and receives it into a
staging buffer while the collector keeps stepping its environment; a poll between
steps then applies it in one step by pointing the policy's tensors at the staging
buffer (no copy), so the policy is never half old, half new.

The background threads hand versions (or the error that ended the stream, raised by
the next ``receive_weights``) over through one queue (:mod:`~weight_sync.collector.handoff`).

With ``ReceiverConfig.reattach_timeout``, a lost learner does not end the stream: the
receiver retires its link to it (no store call to the dead store), and a background
thread waits for a new learner at the same address, joins it as a new *attachment*
and hands its initial weights over through the same queue; items of an attachment
left behind are dropped. Each new learner (a new nonce) is a new :attr:`epoch`.

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
import time
from typing import Any

import torch

from weight_sync.collector.attachment import Attachment, Item, watch_learner
from weight_sync.collector.handoff import HandOff
from weight_sync.collector.hooks import ReceiverHooks
from weight_sync.collector.joining import Joiner
from weight_sync.collector.policy_buffers import PolicyBuffers
from weight_sync.collector.reattach import check_first_version, not_taken_back, wait_for_store
from weight_sync.collector.receiver_link import ReceiverLink
from weight_sync.config import ConnectionInfo, ReceiverConfig, check_timeout, wire_dtype
from weight_sync.errors import (
    ClosedError,
    ConfigError,
    ConnectionFailed,
    ProtocolError,
    WeightSyncError,
    WeightSyncTimeout,
)
from weight_sync.wire.auth import resolve_secret
from weight_sync.wire.layout import BufferLayout

__all__ = ["WeightReceiver"]

log = logging.getLogger(__name__)

# receive_weights gives up on a reattach this long after reattach_timeout even if the
# background attempt has not ended: a store call to a frozen learner never returns.
_REATTACH_GRACE_S = 5.0


class WeightReceiver:
    """Receives versions of the learner's weights into ``policy``.

    Args:
        policy: the collector's ``nn.Module``, TensorDict or ``state_dict``: a module's
            tensors as it holds them at each apply (also ones replaced since), switched
            to the new values without a copy where they can be; a TensorDict's or
            ``state_dict``'s tensors written in place (so a module whose
            ``state_dict()`` they are is updated too); see
            :mod:`weight_sync.collector.policy_buffers`.
        info: the learner's :attr:`WeightSender.connection_info`.
        collector_id: this collector's id, ``0 <= id < info.max_collectors``.
        config: waits; keyword arguments override its fields (``timeout``...).
        hooks: callbacks on the receive path (fault injection, instrumentation).

    Versions across learners (with ``reattach_timeout``): :attr:`epoch` counts the
    learners attached to after the first (a new learner at the same address, told
    apart by its nonce), and versions grow within an epoch. A new learner's first
    version must be at least :attr:`version` unless ``accept_rewind`` (then it may be
    lower: a learner resumed from an older checkpoint), so ``(epoch, version)`` always
    grows.
    """

    def __init__(self, policy: Any, info: ConnectionInfo, collector_id: int,
                 config: ReceiverConfig | None = None, *, hooks: ReceiverHooks | None = None,
                 **overrides: Any) -> None:
        base = config or ReceiverConfig()
        self.config = ReceiverConfig(**{**base.__dict__, **overrides})
        if not isinstance(info, ConnectionInfo):
            raise ConfigError(f"info must be a ConnectionInfo, got {type(info)!r}")
        if (not isinstance(collector_id, int) or isinstance(collector_id, bool)
                or not 0 <= collector_id < info.max_collectors):
            raise ConfigError(f"collector_id must be an int in [0, {info.max_collectors}), "
                              f"got {collector_id!r}")
        self.info = info
        self.collector_id = collector_id
        self.layout = BufferLayout.from_weights(policy)
        self.wire_layout = self.layout.on_wire(wire_dtype(info.wire_dtype))
        """The layout of each message (``layout`` unless the learner narrows floats)."""
        self.version = -1
        self.epoch = 0
        """Learners attached to after the first (``reattach_timeout``): 0 until a new
        learner's weights are applied, then +1 per new learner."""
        self.transport = ""
        """The transport the learner chose for this collector (set by :meth:`connect`)."""
        self._att = Attachment()
        self._connected = False
        self._nonce = ""  # the nonce of the learner whose weights are applied
        self._refused_before = 0  # refusals on the links of learners left behind
        self._buffers = PolicyBuffers(policy, self.layout, self.wire_layout, self._who())
        self._handoff = HandOff(self._who(), str(collector_id), self._buffers,
                                self.config.idle_slice)
        self._error: WeightSyncError | None = None  # the stream's end, once raised
        self._closed = False
        self._joiner = Joiner(info, self.config, collector_id, self.layout, self.wire_layout,
                              self._buffers, self._handoff, hooks,
                              resolve_secret(self.config.secret, "ReceiverConfig"))
        if self.config.learner_timeout <= info.heartbeat_s:
            raise ConfigError(f"ReceiverConfig.learner_timeout must exceed the learner's "
                              f"beat interval ({info.heartbeat_s}s), got "
                              f"{self.config.learner_timeout!r}")

    def __enter__(self) -> WeightReceiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _who(self) -> str:
        return f"collector {self.collector_id}"

    @property
    def _link(self) -> ReceiverLink | None:
        """The link to the learner attached to now (``None`` while re-attaching)."""
        return self._att.link

    @property
    def refused(self) -> int:
        """Messages refused so far as corrupted in transit (each asked for again;
        none of them applied)."""
        link = self._att.link
        return self._refused_before + (0 if link is None else link.refused)

    def connect(self, timeout: float = 60.0) -> int:
        """Join the learner, check layouts, and apply the initial weights.

        Returns:
            The version applied (the learner's current version).

        Raises:
            ConnectionFailed: no store at ``info.host:info.port`` within ``timeout``
                (also one that accepts connections and never answers).
            ProtocolError: this receiver is already connected (the stream is left
                alone).
            ConfigError: ``timeout`` is not a positive finite number.
            LayoutMismatchError: this policy differs from the learner's (listed).
            DuplicateCollectorError: a live process already serves this id.
            AuthenticationError: with a shared secret on either side, the other side
                could not prove it knows it.
            WeightSyncTimeout: the learner did not complete the sync in time.
        """
        timeout = check_timeout(f"{self._who()}: connect", timeout, zero=False)
        if self._closed:
            raise ClosedError(f"{self._who()}: connect() after close()")
        if self._connected:  # a second join would be refused as a duplicate of this one
            raise ProtocolError(f"{self._who()}: connect() while already connected (over "
                                f"{self.transport!r}, version {self.version}); the stream "
                                f"goes on")
        deadline = time.monotonic() + timeout
        att = self._att
        # One client per thread: this one (closing), the listener's (acks), the heartbeat's.
        control = self._joiner.control(timeout)
        try:
            version, data = self._joiner.attach_within(att, control, deadline)
            self.transport = att.transport
            self._buffers.apply(data)
            del data
            self.version = version
            self._nonce, att.fresh = att.nonce, False
            att.applied = version  # acked by the listener, first thing
            att.acked.clear()
        except BaseException:
            self.close()
            raise
        self._connected = True
        threads = self._handoff
        threads.start_thread(att, "watch", lambda: watch_learner(att, self.info.heartbeat_s))
        threads.start_thread(att, "rx", lambda: threads.listen(att))
        log.info("%s connected over %r, version %d", self._who(), self.transport, version)
        return version

    def _reattach(self, old: Attachment, new: Attachment, cause: WeightSyncError) -> None:
        """Retire ``old`` (its learner is lost), wait for a learner at the same address,
        attach ``new`` to it and hand its first message over; then listen on it."""
        deadline = time.monotonic() + self.config.reattach_timeout
        self._handoff.retire(old)
        if not wait_for_store(self.info, deadline, new.stop, self._who(), cause):
            return
        try:
            version, data = self._joiner.attach(
                new, self._joiner.control(deadline - time.monotonic()), deadline)
        except ConnectionFailed as exc:  # something listens there, but no learner answers
            raise not_taken_back(self._who(), self.info, self.config.reattach_timeout,
                                 f": {exc}") from exc
        if new.stop.is_set():  # closed meanwhile: release what was just built
            self._handoff.retire(new)
            return
        self.transport = new.transport
        self._handoff.start_thread(new, "watch",
                                   lambda: watch_learner(new, self.info.heartbeat_s))
        self._handoff.put(Item(new, version, data))
        del data
        if self._handoff.wait_applied(new):
            self._handoff.listen(new)

    def _begin_reattach(self, cause: WeightSyncError) -> None:
        """Leave the lost learner behind and start waiting for a new one (background)."""
        old = self._att
        old.lost = True
        self._buffers.keep_private()
        if old.link is not None:
            self._refused_before += old.link.refused
        new = self._att = Attachment(
            deadline=time.monotonic() + self.config.reattach_timeout + _REATTACH_GRACE_S)
        log.warning("%s: lost the learner at %s:%d (%s); keeping version %d and waiting "
                    "up to %.1fs for a new learner", self._who(), self.info.host,
                    self.info.port, cause, self.version, self.config.reattach_timeout)
        self._handoff.start_thread(new, "reattach", lambda: self._reattach(old, new, cause))

    def _first_of(self, att: Attachment, version: int) -> None:
        """Check the first version of a learner re-attached to (refused: this stream
        ends and that learner is told this collector left)."""
        try:
            check_first_version(self._who(), f"{self.info.host}:{self.info.port}", version,
                                self.version, self.config.accept_rewind)
        except ProtocolError as exc:
            self._error = exc
            att.stop.set()
            self._handoff.applied.set()
            if att.link is not None:
                att.link.stop()
            raise

    def receive_weights(self, timeout: float | None = 0) -> int | None:
        """Apply the newest received weights, if any.

        Args:
            timeout: ``0`` polls and never blocks; ``> 0`` waits up to that long for
                new weights; ``None`` waits up to ``config.timeout`` and raises.

        Returns:
            The version just applied, or ``None`` if nothing new arrived (also while
            re-attaching to a new learner, with ``reattach_timeout``).

        Raises:
            ClosedError: the learner closed the stream, or this receiver is closed.
            PeerGone: the learner died, or gave no sign of life for
                ``config.learner_timeout`` s (frozen, cut off); with
                ``reattach_timeout``, no new learner answered at its address in time.
            LayoutMismatchError: (re-attaching) the new learner's weights differ from
                this policy (listed; nothing applied).
            AuthenticationError: with a secret, a forged or replayed signal, or
                (re-attaching) a new learner that does not know the secret (nothing
                applied).
            IntegrityError: messages kept arriving corrupted (nothing applied).
            ProtocolError: an out-of-order or repeated version, or (re-attaching) a
                new learner starting below :attr:`version` without ``accept_rewind``
                (nothing applied).
            WeightSyncError: whatever ended the background receive, as it ended it.
        """
        if self._closed:
            raise ClosedError(f"{self._who()}: receive_weights() after close()")
        if not self._connected:
            raise ProtocolError(f"{self._who()}: receive_weights() before connect()")
        if self._error is not None:
            raise self._error
        wait = self.config.timeout if timeout is None else check_timeout(
            f"{self._who()}: receive_weights", timeout)
        deadline = time.monotonic() + wait
        while True:
            left = deadline - time.monotonic()
            try:
                item = self._handoff.inbox.get(block=left > 0,
                                               timeout=left if left > 0 else None)
            except queue.Empty:
                self._check_reattach_deadline()
                if timeout is None:
                    raise WeightSyncTimeout(f"{self._who()}: no new weights after version "
                                            f"{self.version} within {wait:.2f}s") from None
                return None
            att = item.attachment
            if att is not self._att:
                continue  # from a learner left behind
            if item.error is not None:
                if self._may_reattach(att, item.error):
                    self._begin_reattach(item.error)
                    continue
                self._error = item.error
                raise item.error
            return self._apply_item(att, item.version, item.data)

    def _check_reattach_deadline(self) -> None:
        """Raise if a reattach outlived its bound without a word from its thread (stuck
        in a store call to a learner that froze while it was joined)."""
        att = self._att
        if not att.fresh or time.monotonic() <= att.deadline:
            return
        att.lost = True
        att.stop.set()
        self._error = not_taken_back(
            self._who(), self.info, self.config.reattach_timeout,
            f" (+{_REATTACH_GRACE_S}s): the learner found there does not answer")
        raise self._error

    def _apply_item(self, att: Attachment, version: int, data: torch.Tensor | None) -> int:
        if att.fresh:
            self._first_of(att, version)
        elif version <= self.version:
            self._error = ProtocolError(f"{self._who()}: received version {version} after "
                                        f"{self.version}; refused, nothing applied")
            raise self._error
        assert data is not None and att.link is not None
        self._buffers.apply(data)
        del data
        if att.fresh:
            att.fresh = False
            if att.nonce != self._nonce:
                self._nonce = att.nonce
                self.epoch += 1
            log.info("%s: re-attached, epoch %d, version %d (was %d)", self._who(),
                     self.epoch, version, self.version)
        self.version = version
        att.applied = version
        att.acked.clear()
        self._handoff.applied.set()  # the listener acks it, off this thread
        return version

    def _may_reattach(self, att: Attachment, error: WeightSyncError) -> bool:
        """Whether ``error`` (the end of ``att``'s stream) starts a reattach: the
        learner was lost after it served weights (a failed reattach is final)."""
        return (self.config.reattach_timeout > 0 and not att.fresh
                and isinstance(error, ConnectionFailed))

    def close(self) -> None:
        """Stop the background threads and release the link; idempotent. The policy
        keeps the last applied weights (in its own memory, also after a zero-copy
        transport)."""
        if self._closed:
            return
        self._closed = True
        self._buffers.keep_private()
        self._handoff.retire(self._att)
        self._handoff.drain()  # buffers handed over but never applied
        self._buffers.forget_views()
