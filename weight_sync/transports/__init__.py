"""Transports: how one packed message travels from the learner to one collector.

A transport is a pair of classes, the learner's end (:class:`SenderTransport`) and a
collector's end (:class:`ReceiverTransport`), registered by name. Built in:
``"distributed"`` (a gloo/nccl pair group per collector), ``"shm"`` (same-host
shared memory, falling back to ``"distributed"`` for collectors that do not share it)
and ``"relay"`` (the learner sends each version once; collectors forward it host to
host while it arrives).
"""

from weight_sync.transports.base import (
    LearnerSide,
    LinkSpec,
    Offer,
    ReceiverTransport,
    SenderTransport,
    Sending,
)
from weight_sync.transports.registry import (
    TransportSpec,
    get_transport,
    register_transport,
    transport_names,
)

__all__ = ["LearnerSide", "LinkSpec", "Offer", "Sending", "SenderTransport", "ReceiverTransport",
           "TransportSpec", "register_transport", "get_transport", "transport_names"]
