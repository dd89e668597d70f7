"""A collector's end of its link: :class:`ReceiverLink`.

Waits for the learner's signal of the next message, has the transport end (any
:class:`~weight_sync.transports.base.ReceiverTransport`) fill a flat buffer, and checks
the message's header against the signalled version, the same for every transport.
"""

from __future__ import annotations

import torch

from weight_sync.control import Control
from weight_sync.errors import ClosedError, ProtocolError
from weight_sync.hooks import ReceiverHooks
from weight_sync.packing import read_header
from weight_sync.transports.base import LinkSpec, ReceiverTransport

__all__ = ["ReceiverLink"]


class ReceiverLink:
    """Receives the learner's messages into flat buffers (collector side).

    Args:
        spec: the link.
        end: the transport's collector end.
        listener: the store client of the thread that calls :meth:`receive`.
        acker: the store client of the thread that calls :meth:`ack` and :meth:`close`
            (a TCPStore client must not be shared between threads).
        hooks: fault-injection and instrumentation hooks.
        lends: the transport lends its messages (zero-copy) instead of filling buffers.
    """

    def __init__(self, spec: LinkSpec, end: ReceiverTransport, listener: Control,
                 acker: Control, hooks: ReceiverHooks | None = None, *,
                 lends: bool = False) -> None:
        self.spec = spec
        self.lends = lends
        self.collector_id = spec.collector_id
        self.incarnation = spec.incarnation
        self._end = end
        self._listener = listener
        self._acker = acker
        self._hooks = hooks or ReceiverHooks()
        self._seq = 0  # next message number
        self._spent: list[tuple[int, int | None]] = []  # (seq, previous version) to delete
        self._last_version: int | None = None
        self._stopped = False
        self._closed = False

    def connect(self, timeout: float) -> None:
        """Rendezvous of the transport ends (bounded)."""
        if self._hooks.before_connect is not None:
            self._hooks.before_connect(self.collector_id, self.incarnation)
        self._end.connect(self._listener.link(self.collector_id, self.incarnation), timeout)

    def receive(self, buffer: torch.Tensor | None,
                timeout: float) -> tuple[int, torch.Tensor] | None:
        """Receive the next message if the learner signals one within ``timeout``
        (``0`` polls): its version and the tensor holding it (``buffer``, filled, or the
        transport's own when it lends; ``buffer`` is ``None`` then), or ``None``.

        The acknowledgement is separate (:meth:`ack`), sent once the weights are used.

        Raises:
            ClosedError: the learner closed the stream (or this link was closed).
            PeerGone: the learner's process or store went away, or a transfer was cut
                short (``buffer`` then holds garbage: do not apply it).
            ProtocolError: a message whose header is not ours or names another
                version (torn or foreign).
        """
        cid, inc = self.collector_id, self.incarnation
        update = self._listener.next_update(cid, inc, self._seq, timeout)
        if update is None:
            return None
        if update.closed:
            self._listener.bye(cid, inc)  # the learner keeps its store up until we did
            raise ClosedError(f"{self.spec.who()}: the weight stream was closed")
        if self._hooks.before_receive is not None:
            self._hooks.before_receive(update.version, None if self.lends else buffer)
        data = self._end.receive(update.note, None if self.lends else buffer,
                                 self.spec.timeout)
        if self._hooks.after_receive is not None:
            self._hooks.after_receive(update.version, data)
        got = read_header(data, self.spec.layout)
        if got != update.version:
            raise ProtocolError(f"{self.spec.who()}: message announced as version "
                                f"{update.version} carries version {got}")
        # The learner sent this message after reading the previous one's ack: both
        # keys are spent. Deleted by collect_garbage(), off the latency path.
        self._spent.append((self._seq, self._last_version))
        self._last_version = update.version
        self._seq += 1
        return update.version, data

    def collect_garbage(self) -> None:
        """Delete the store keys of messages already received and acked (listener)."""
        while self._spent:
            seq, version = self._spent.pop()
            self._listener.forget(self.collector_id, self.incarnation, seq, version)

    def ack(self, version: int) -> None:
        """Tell the learner ``version`` is applied.

        Raises:
            PeerGone: the learner's store is gone.
        """
        self._acker.ack(self.collector_id, self.incarnation, version)

    def stop(self) -> None:
        """Tell the learner this collector leaves, and wake a :meth:`receive` waiting
        for the next message (it raises ``ClosedError``); idempotent."""
        if self._stopped:
            return
        self._stopped = True
        self._acker.leave(self.collector_id, self.incarnation)
        self._acker.post_closed(self.collector_id, self.incarnation, self._seq)

    def close(self) -> None:
        """:meth:`stop`, then release the transport end and the store clients;
        idempotent. Call it once no thread uses the link's messages any more."""
        if self._closed:
            return
        self._closed = True
        self.stop()
        self._end.close()
        # The listener may still be inside a call on its client: the client's socket
        # closes when that call returns.
        self._listener.close()
        self._acker.close()
