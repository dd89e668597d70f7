"""Transports: how one packed message travels from the learner to one collector.

Everything a transport author needs is here. A transport is a pair of ends, the
learner's (:class:`SenderTransport`, or a :class:`LearnerSide` that builds cooperating
ends) and a collector's (:class:`ReceiverTransport`), built from a :class:`LinkSpec`,
meeting through a :class:`LinkChannel`, moving a :class:`Snapshot`'s buffer; a
:class:`TransportSpec` names the pair and declares, in one place, what it can do.
Register it in-process with :func:`register_transport`, or ship it in a package with
an entry point in the group :data:`ENTRY_POINT_GROUP` (``"weight_sync.transports"``) so
that every process finds it without an import.

Built in (loaded on first use): ``"distributed"`` (a gloo/nccl pair group per
collector), ``"shm"`` (same-host shared memory, falling back to ``"distributed"`` for
collectors that do not share it) and ``"relay"`` (the learner sends each version once;
collectors forward it host to host while it arrives).
"""

from weight_sync.control.channel import LinkChannel
from weight_sync.transports.base import (
    EarlyReceiver,
    LearnerSide,
    LinkSpec,
    Offer,
    ReceiverTransport,
    SenderTransport,
    Sending,
    StreamingReceiver,
    StreamingSender,
)
from weight_sync.transports.registry import (
    ENTRY_POINT_GROUP,
    LinkCapabilities,
    TransportSpec,
    get_transport,
    register_transport,
    transport_names,
)
from weight_sync.wire.snapshots import Snapshot

__all__ = [
    # the ends, required and optional
    "SenderTransport", "ReceiverTransport", "Sending", "LearnerSide", "Offer",
    "StreamingSender", "StreamingReceiver", "EarlyReceiver",
    # what they are built with and use
    "LinkSpec", "LinkChannel", "Snapshot",
    # declaring and finding transports
    "TransportSpec", "LinkCapabilities", "register_transport", "get_transport",
    "transport_names", "ENTRY_POINT_GROUP",
]
