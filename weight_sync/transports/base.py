"""What a transport is: one end on the learner, one end on each collector.

A transport moves one packed message (a flat ``uint8`` buffer laid out by
:class:`~weight_sync.wire.layout.BufferLayout`) from the learner to one collector. It does
nothing else: versions, acks, liveness, no-backlog and applying weights are the job of
the links (:class:`~weight_sync.learner.sender_link.SenderLink`,
:class:`~weight_sync.collector.receiver_link.ReceiverLink`) that hold a transport end through
these protocols and never by its class.

The message's arrival is signalled through the store (``update`` keys) by the links;
a transport may add a *note* to that signal (e.g. which shared-memory segment holds
the message), and may use its link's :class:`~weight_sync.control.channel.LinkChannel` for its
own rendezvous.

Writing one::

    class MySender:                         # learner's end, one per collector
        def __init__(self, spec: LinkSpec) -> None: ...
        def connect(self, channel: LinkChannel, timeout: float) -> None: ...
        def send(self, snapshot: Snapshot) -> Sending: ...   # start; never block long
        def close(self) -> None: ...

    class MyReceiver:                       # collector's end
        def __init__(self, spec: LinkSpec) -> None: ...
        def connect(self, channel: LinkChannel, timeout: float) -> None: ...
        def receive(self, note: str, buffer: torch.Tensor | None,
                    timeout: float) -> torch.Tensor: ...   # fills and returns buffer
        def close(self) -> None: ...

    register_transport(TransportSpec("mine", sender=MySender, receiver=MyReceiver))
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from weight_sync.control.channel import LinkChannel
from weight_sync.wire.layout import BufferLayout
from weight_sync.wire.snapshots import Snapshot

__all__ = ["LinkSpec", "Sending", "SenderTransport", "StreamingSender", "ReceiverTransport",
           "StreamingReceiver", "EarlyReceiver", "Offer", "LearnerSide"]


@dataclass(frozen=True)
class LinkSpec:
    """What either end of a link is built with.

    Attributes:
        collector_id: the collector at the other end (or this collector).
        incarnation: which connect of that collector id the link belongs to.
        layout: the message layout (``layout.nbytes`` bytes per message).
        backend: ``"gloo"`` or ``"nccl"``; tells where buffers live.
        timeout: bound on the rendezvous and on each transfer, seconds.
        bind_host: local address to listen on or bind (``None``: the transport's
            default). A collector's end gets its address on the route to the learner.
        progress: collector side, for transports that stream a message in pieces:
            called with ``(version, bytes received so far)`` after each piece
            (:attr:`~weight_sync.collector.hooks.ReceiverHooks.during_receive`).
    """

    collector_id: int
    incarnation: int
    layout: BufferLayout
    backend: str = "gloo"
    timeout: float = 60.0
    bind_host: str | None = None
    progress: Callable[[int, int], None] | None = None

    @property
    def device(self) -> torch.device:
        """Where message buffers live for this backend."""
        if self.backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def who(self) -> str:
        return f"collector {self.collector_id} (incarnation {self.incarnation})"


@runtime_checkable
class Sending(Protocol):
    """One message on its way (learner side)."""

    note: str
    """Detail the collector's end needs to fetch it (``""`` if none)."""

    def done(self) -> bool:
        """Non-blocking: True once the transport no longer needs the snapshot.

        Raises:
            WeightSyncError: the transfer failed.
        """
        ...

    def finish(self, timeout: float) -> None:
        """Block (at most ``timeout``) until :meth:`done`; raise if the transfer failed."""
        ...


@runtime_checkable
class SenderTransport(Protocol):
    """The learner's end of a transport to one collector."""

    def connect(self, channel: LinkChannel, timeout: float) -> None:
        """Rendezvous with the collector's end (bounded); may run on another thread
        than the sends, with its own ``channel``."""
        ...

    def send(self, snapshot: Snapshot) -> Sending:
        """Start moving ``snapshot.buffer`` to the collector; must not wait for the
        collector to receive it. The snapshot stays valid until the returned
        :class:`Sending` is done."""
        ...

    def close(self) -> None:
        """Release what the end holds; idempotent."""
        ...


@runtime_checkable
class StreamingSender(SenderTransport, Protocol):
    """A learner's end that can start a message before it is packed: on a link where
    its spec says it ``streams`` (:meth:`TransportSpec.capabilities
    <weight_sync.transports.registry.TransportSpec.capabilities>`), :meth:`send` may be
    given a snapshot still being packed, and the end waits for each span's bytes
    (:meth:`~weight_sync.wire.snapshots.Snapshot.wait_packed`) before sending it."""


@runtime_checkable
class ReceiverTransport(Protocol):
    """A collector's end of a transport from the learner."""

    def connect(self, channel: LinkChannel, timeout: float) -> None:
        """Rendezvous with the learner's end (bounded)."""
        ...

    def receive(self, note: str, buffer: torch.Tensor | None,
                timeout: float) -> torch.Tensor:
        """Receive the message the learner just signalled (with ``note``), at most
        ``timeout`` s, and return the flat tensor that holds it.

        A transport registered with ``lends=False`` fills ``buffer`` (a private
        ``uint8`` buffer of ``layout.nbytes`` bytes, or of a changed-only message's
        size for one registered with ``deltas=True``) and returns it. One registered with
        ``lends=True`` gets ``buffer=None`` and returns a tensor over the learner's own
        memory (zero-copy); the learner keeps that memory unchanged until this
        collector acks a newer version.

        Raises:
            PeerGone: the transfer failed or was cut short (the message then holds
                garbage; the link never applies it).
        """
        ...

    def close(self) -> None:
        """Release what the end holds; idempotent."""
        ...


@runtime_checkable
class StreamingReceiver(ReceiverTransport, Protocol):
    """A collector's end that reports each piece of a message as it lands (on a link
    where its spec says it ``streams``)."""

    def receive(self, note: str, buffer: torch.Tensor | None, timeout: float,
                landed: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """As :meth:`ReceiverTransport.receive`; ``landed(start, end)`` is called, in
        the receiving thread, as each byte span of ``buffer`` is filled (in the order
        they land; together they cover the message once)."""
        ...


@runtime_checkable
class EarlyReceiver(ReceiverTransport, Protocol):
    """A collector's end that can post the receive of the next whole message before
    the learner signals it, so the bytes flow as soon as the learner sends them (on a
    link where its spec says it ``posts_early``)."""

    def post(self, buffer: torch.Tensor) -> None:
        """Post the receive of the next message into ``buffer`` (again with the same
        ``buffer``: nothing more); the next :meth:`receive` into ``buffer`` completes
        it. Only while that message, when it comes, is a whole one (not changed-only)
        and the learner sends nothing else on the link first.

        Raises:
            PeerGone: the receive could not be posted (the learner's end is gone).
            ProtocolError: a receive into another buffer is still posted.
        """
        ...


@runtime_checkable
class Offer(Protocol):
    """Learner side of a transport that only some collectors can use: the parameters
    it publishes, and its judgement of what a collector found probing them."""

    params: dict[str, str]

    def accepts(self, evidence: Mapping[str, str]) -> bool:
        """True if a collector that found ``evidence`` can use this transport."""
        ...

    def close(self) -> None:
        ...


@runtime_checkable
class LearnerSide(Protocol):
    """Learner-wide state of a transport whose ends cooperate (the relay's topology and
    server): one per :class:`~weight_sync.WeightSender`, which builds every link's
    learner end through it."""

    def end(self, spec: LinkSpec) -> SenderTransport:
        """The learner's end of one collector's link."""
        ...

    def close(self) -> None:
        """Release what it holds (after every end closed); idempotent."""
        ...
