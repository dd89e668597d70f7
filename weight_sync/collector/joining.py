"""How a collector attaches to a learner: :class:`Joiner` joins (the handshake), starts
the heartbeat, connects the link and receives the first message, within the connect's
bound whatever the learner does meanwhile."""

from __future__ import annotations

import logging
import time

import torch

from weight_sync.collector.attachment import Attachment, heartbeat
from weight_sync.collector.handoff import HandOff
from weight_sync.collector.hooks import ReceiverHooks
from weight_sync.collector.policy_buffers import PolicyBuffers
from weight_sync.collector.receiver_link import ReceiverLink
from weight_sync.config import ConnectionInfo, ReceiverConfig
from weight_sync.control.channel import Control
from weight_sync.control.discovery import address_towards
from weight_sync.control.liveness import LearnerWatch
from weight_sync.control.store import TooLate, run_bounded
from weight_sync.errors import ClosedError, PeerGone, WeightSyncTimeout
from weight_sync.handshake import join
from weight_sync.transports.base import LinkSpec
from weight_sync.transports.registry import get_transport
from weight_sync.wire.layout import BufferLayout

__all__ = ["Joiner"]

log = logging.getLogger(__name__)

# A bounded attach waits this much past its deadline for a join whose waits end there.
_JOIN_MARGIN_S = 0.5


class Joiner:
    """Attaches one collector's receiver to the learner at ``info``'s address.

    Args:
        info, config, collector_id: the receiver's.
        layout: the policy's layout (checked against the learner's);
            ``wire_layout``: the messages'.
        buffers: the policy's buffers (the first message is received into staging).
        handoff: starts the attachment's threads and retires it.
        hooks: the receiver's callbacks; ``secret``: its shared secret.
    """

    def __init__(self, info: ConnectionInfo, config: ReceiverConfig, collector_id: int,
                 layout: BufferLayout, wire_layout: BufferLayout, buffers: PolicyBuffers,
                 handoff: HandOff, hooks: ReceiverHooks | None, secret: bytes | None) -> None:
        self.info, self.config, self.collector_id = info, config, collector_id
        self._layout, self._wire_layout = layout, wire_layout
        self._buffers, self._handoff = buffers, handoff
        self._hooks, self._secret = hooks, secret
        self._who = f"collector {collector_id}"

    def control(self, timeout: float) -> Control:
        """A new client of the learner's store (one per thread that uses it)."""
        return Control.connect(self.info.host, self.info.port, self.info.name,
                               max(timeout, 0.1))

    def attach_within(self, att: Attachment, control: Control,
                      deadline: float) -> tuple[int, torch.Tensor]:
        """:meth:`attach` by ``deadline``: a store call to a learner that froze after
        accepting the connection answers only when it wakes.

        Raises:
            PeerGone: the learner stopped answering during the join (the attempt is
                left to end on its own, and tells the learner it left when it wakes).
        """
        def release(_: object) -> None:  # the learner answers again: tell it we left
            self._handoff.retire(att, reach=True)

        try:
            return run_bounded(lambda: self.attach(att, control, deadline),
                               max(deadline - time.monotonic(), 0.001) + _JOIN_MARGIN_S,
                               f"join-{self.collector_id}", on_late=release)
        except TooLate:
            att.lost = True  # no store call may reach it any more
            raise PeerGone(f"{self._who}: the learner at {self.info.host}:{self.info.port} "
                           f"stopped answering during the join (frozen, or cut off)") from None

    def attach(self, att: Attachment, control: Control,
               deadline: float) -> tuple[int, torch.Tensor]:
        """Join the learner through ``control`` (the acking client, which the link takes
        over), start beating, connect the link and receive its first message (not
        applied): its version and buffer. ``att`` gets the link, the transport, the
        learner's nonce and the watch of its beat.

        Raises:
            ClosedError: ``att`` was stopped while the join waited (the learner is told
                this collector left).
        """
        try:
            joined = join(control, self._layout, self.collector_id, deadline, self._secret)
        except BaseException:
            control.close()
            raise
        inc, verdict = joined.incarnation, joined.verdict
        if att.stop.is_set():  # the caller gave up meanwhile (a learner that froze)
            control.leave(self.collector_id, inc)
            control.close()
            raise ClosedError(f"{self._who}: gave up the join before the learner's answer")
        att.nonce, att.transport = joined.learner_nonce, verdict.transport
        spec = LinkSpec(self.collector_id, inc, self._wire_layout, backend=self.info.backend,
                        timeout=self.config.timeout,
                        bind_host=address_towards(self.info.host, self.info.port),
                        progress=None if self._hooks is None else self._hooks.during_receive)
        att.watch = LearnerWatch(self._who, self.config.learner_timeout)
        beat = self.control(deadline - time.monotonic())
        cid, every = self.collector_id, self.info.heartbeat_s
        self._handoff.start_thread(att, "beat", lambda: heartbeat(att, beat, cid, inc, every))
        transport = get_transport(verdict.transport)
        try:
            link = ReceiverLink(spec, transport.receiver(spec),
                                self.control(deadline - time.monotonic()), control,
                                self._hooks, lends=transport.lends, key=joined.key,
                                changed_only=self.info.changed_only, local=verdict.local,
                                **vars(transport.capabilities(spec)))
        except BaseException:
            control.close()
            raise
        att.link = link
        link.connect(deadline - time.monotonic())
        self._buffers.place(spec.device)
        message = None
        while message is None and (left := deadline - time.monotonic()) > 0:
            # None: refused as corrupted, asked for again.
            message = link.receive(self._buffers.staging(link.lends), left)
        if message is None:
            raise WeightSyncTimeout(f"{self._who}: no initial weights from the learner "
                                    f"at {self.info.host}:{self.info.port} in time")
        log.info("%s attached (incarnation %d) over %r, its version %d", self._who, inc,
                 verdict.transport, message[0])
        return message
