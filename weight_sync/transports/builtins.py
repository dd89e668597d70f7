"""The built-in transports' specs. Imported by the registry the first time one of them
is looked up, so ``import weight_sync`` loads none of their modules."""

from __future__ import annotations

from weight_sync.transports.base import LearnerSide
from weight_sync.transports.distributed_receiver import DistributedReceiver, posts_early
from weight_sync.transports.distributed_sender import DistributedSender
from weight_sync.transports.registry import TransportSpec
from weight_sync.transports.relay_receiver import RelayReceiver, probe_relay
from weight_sync.transports.relay_sender import RelayHub, RelayOffer
from weight_sync.transports.shm_receiver import ShmReceiver, probe_shm
from weight_sync.transports.shm_sender import ShmOffer, ShmSender
from weight_sync.transports.streaming import streams

__all__ = ["distributed", "relay", "shm"]


def _shm_offer(side: LearnerSide | None) -> ShmOffer:
    return ShmOffer()


distributed = TransportSpec("distributed", sender=DistributedSender,
                            receiver=DistributedReceiver, deltas=True, streams=streams,
                            posts_early=posts_early)
shm = TransportSpec("shm", sender=ShmSender, receiver=ShmReceiver, backends=("gloo",),
                    fallback="distributed", shared_snapshots=True, lends=True,
                    offer=_shm_offer, probe=probe_shm, proves_host=True)
relay = TransportSpec("relay", sender=None, receiver=RelayReceiver, backends=("gloo",),
                      learner=RelayHub, offer=RelayOffer, probe=probe_relay)
