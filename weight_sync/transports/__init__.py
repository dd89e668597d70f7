"""Transports: how packed weights travel from the learner to one collector."""

from weight_sync.transports.base import Transport
from weight_sync.transports.distributed import COLLECTOR_RANK, LEARNER_RANK, DistributedTransport

__all__ = ["Transport", "DistributedTransport", "LEARNER_RANK", "COLLECTOR_RANK"]
