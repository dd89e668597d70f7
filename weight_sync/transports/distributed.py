"""torch.distributed point-to-point transport, under torchrl's name.

torchrl's ``DistributedTransport`` is one class playing both roles; here the roles are
two classes, :class:`~weight_sync.transports.sender_link.SenderLink` (learner) and
:class:`~weight_sync.transports.receiver_link.ReceiverLink` (collector), over a
standalone two-rank gloo or nccl group per collector. One message (the whole packed
snapshot) moves per update.
"""

from __future__ import annotations

from typing import Any

from weight_sync.errors import ConfigError
from weight_sync.transports.pair import COLLECTOR_RANK, LEARNER_RANK
from weight_sync.transports.receiver_link import ReceiverLink
from weight_sync.transports.sender_link import SenderLink

__all__ = ["DistributedTransport", "SenderLink", "ReceiverLink"]


# Named like torchrl's class, which it stands in for.
def DistributedTransport(*args: Any, rank: int, **kwargs: Any) -> SenderLink | ReceiverLink:
    """The learner's (``rank=LEARNER_RANK``) or a collector's end of a link.

    Arguments as :class:`~weight_sync.transports.pair.PairLink`
    (``store, keys, collector_id, incarnation, *, layout, backend, timeout,
    bind_host``); a collector's end also takes ``ack_store``.
    """
    if rank == LEARNER_RANK:
        return SenderLink(*args, **kwargs)
    if rank == COLLECTOR_RANK:
        return ReceiverLink(*args, **kwargs)
    raise ConfigError(f"rank must be {LEARNER_RANK} or {COLLECTOR_RANK}, got {rank!r}")
