"""The transport interface: one object per end of a learner-collector link.

Method names follow torchrl's ``TransportBackend`` / ``DistributedTransport`` so that a
torchrl user recognises them. torchrl puts both roles in one class; here each role is
its own protocol. A :class:`SenderTransport` moves packed snapshots to its collector
and tracks that collector's acks; a :class:`ReceiverTransport` receives messages into
a flat buffer. Versions, snapshots and applying weights to a policy
are the job of :class:`~weight_sync.WeightSender` and
:class:`~weight_sync.WeightReceiver`, which hold the transports.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch

from weight_sync.snapshots import Snapshot

__all__ = ["SenderTransport", "ReceiverTransport", "Transport"]


@runtime_checkable
class SenderTransport(Protocol):
    """The learner's end of a point-to-point weight link to one collector."""

    collector_id: int

    def setup_connection_and_weights_on_sender(self, snapshot: Snapshot) -> None:
        """Rendezvous with the collector and start the initial sync of ``snapshot``."""
        ...

    def send_initial_weights(self, snapshot: Snapshot) -> None:
        """Send ``snapshot`` as the first message and wait until it is applied."""
        ...

    def send_weights_async(self, snapshot: Snapshot) -> None:
        """Start sending ``snapshot`` (or queue it as the newest); never blocks."""
        ...

    def send_weights(self, snapshot: Snapshot) -> None:
        """Send ``snapshot`` and wait until the collector applied it."""
        ...

    def wait_ack(self, timeout: float) -> None:
        """Wait until the newest snapshot handed to this link is applied."""
        ...

    def close(self) -> None:
        """Release the link and tell the collector the stream ended; idempotent."""
        ...


@runtime_checkable
class ReceiverTransport(Protocol):
    """A collector's end of a point-to-point weight link from the learner."""

    collector_id: int

    def setup_connection_and_weights_on_receiver(
        self, *, worker_idx: int, weights: Any = None, model: Any = None,
        strategy: Any = None,
    ) -> int:
        """Rendezvous with the learner and receive the initial weights."""
        ...

    def receive_initial_weights(self, weights: torch.Tensor) -> int:
        """Receive the first message into the flat buffer ``weights``."""
        ...

    def receive_weights(
        self, timeout: float | None = None, *, weights: Any = None, model: Any = None,
        strategy: Any = None,
    ) -> int | None:
        """Receive the next message if one comes within ``timeout``; its version."""
        ...

    def ack(self, version: int) -> None:
        """Tell the learner ``version`` is applied."""
        ...

    def close(self) -> None:
        """Release the link; idempotent."""
        ...


#: Either end of a link.
Transport = SenderTransport | ReceiverTransport
