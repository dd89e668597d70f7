"""Transports: how packed weights travel from the learner to one collector."""

from weight_sync.transports.base import ReceiverTransport, SenderTransport, Transport
from weight_sync.transports.distributed import DistributedTransport
from weight_sync.transports.pair import COLLECTOR_RANK, LEARNER_RANK
from weight_sync.transports.receiver_link import ReceiverLink
from weight_sync.transports.sender_link import SenderLink

__all__ = ["Transport", "SenderTransport", "ReceiverTransport", "DistributedTransport",
           "SenderLink", "ReceiverLink", "LEARNER_RANK", "COLLECTOR_RANK"]
