"""Transports by name: the built-ins, and any a user registers.

``WeightSender(..., transport="<name>")`` proposes a transport; for each collector the
learner takes the first of that transport and its fallbacks that both ends can use,
and tells the collector which one in its admission verdict. A collector looks the name
up in its own registry, so a user's transport must be registered in both processes
(e.g. at import of the module that defines it).

Example::

    from weight_sync.transports import TransportSpec, register_transport

    register_transport(TransportSpec("pipe", sender=PipeSender, receiver=PipeReceiver))
    sender = WeightSender(policy, 4, transport="pipe")
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from weight_sync.config import SenderConfig
from weight_sync.errors import ConfigError
from weight_sync.transports.base import (
    LearnerSide,
    LinkSpec,
    Offer,
    ReceiverTransport,
    SenderTransport,
)
from weight_sync.transports.distributed_receiver import DistributedReceiver
from weight_sync.transports.distributed_sender import DistributedSender
from weight_sync.transports.relay_receiver import RelayReceiver
from weight_sync.transports.relay_sender import RelayHub
from weight_sync.transports.shm_receiver import ShmReceiver, probe_shm
from weight_sync.transports.shm_sender import ShmOffer, ShmSender

__all__ = ["TransportSpec", "register_transport", "get_transport", "transport_names",
           "fallback_chain"]


@dataclass(frozen=True)
class TransportSpec:
    """A registered transport.

    Attributes:
        name: what ``WeightSender(transport=...)`` and the verdicts call it.
        sender: builds the learner's end of one link.
        receiver: builds a collector's end.
        learner: instead of ``sender``, for ends that cooperate: builds the learner-wide
            :class:`LearnerSide` (one per sender, from its config) that builds them.
        backends: the torch.distributed backends (where buffers live) it supports.
        fallback: the transport used for a collector that cannot use this one
            (``None``: such a collector is refused).
        shared_snapshots: the learner's snapshots must live in shared memory.
        lends: collectors use the learner's snapshot in place (zero-copy): the learner
            holds each snapshot until the collector acks a newer one, and the
            collector's end returns its own tensor instead of filling a buffer.
        offer: learner side, for a transport only some collectors can use: makes the
            :class:`Offer` published to collectors (``None``: every collector can).
        probe: collector side: what it finds probing the offer's parameters.
        deltas: each link carries its own messages, of any size: the learner's end sends
            whatever ``buffer`` it is given, the collector's end fills the buffer it is
            given whatever its size. Only such a transport can carry changed-only
            messages (``SenderConfig.changed_only``), whose size and content differ per
            collector; one shared write (``"shm"``) or one stream for all (``"relay"``)
            cannot.
    """

    name: str
    sender: Callable[[LinkSpec], SenderTransport] | None
    receiver: Callable[[LinkSpec], ReceiverTransport]
    backends: tuple[str, ...] = ("gloo", "nccl")
    fallback: str | None = None
    shared_snapshots: bool = False
    lends: bool = False
    offer: Callable[[], Offer] | None = None
    probe: Callable[[Mapping[str, str]], dict[str, str]] | None = None
    learner: Callable[[SenderConfig], LearnerSide] | None = None
    deltas: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or " " in self.name:
            raise ConfigError(f"TransportSpec.name must be a non-empty string without "
                              f"spaces, got {self.name!r}")
        if self.fallback == self.name:
            raise ConfigError(f"transport {self.name!r} cannot fall back to itself")
        if (self.sender is None) == (self.learner is None):
            raise ConfigError(f"transport {self.name!r}: give either sender or learner")
        if (self.offer is None) != (self.probe is None):
            raise ConfigError(f"transport {self.name!r}: give both offer and probe, or "
                              f"neither")


_REGISTRY: dict[str, TransportSpec] = {}


def register_transport(spec: TransportSpec, *, replace: bool = False) -> None:
    """Make ``spec`` available by its name, in this process.

    Raises:
        ConfigError: the name is taken (unless ``replace``), or its fallback unknown.
    """
    if spec.name in _REGISTRY and not replace:
        raise ConfigError(f"a transport named {spec.name!r} is already registered")
    if spec.fallback is not None and spec.fallback not in _REGISTRY:
        raise ConfigError(f"transport {spec.name!r} falls back to {spec.fallback!r}, "
                          f"which is not registered")
    _REGISTRY[spec.name] = spec


def get_transport(name: str) -> TransportSpec:
    """The transport registered as ``name``.

    Raises:
        ConfigError: no such transport (the registered names are listed).
    """
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown transport {name!r}; registered: "
                          f"{sorted(_REGISTRY)}") from None


def transport_names() -> list[str]:
    return sorted(_REGISTRY)


def fallback_chain(name: str) -> list[TransportSpec]:
    """``name``'s spec, then its fallback's, and so on."""
    chain = [get_transport(name)]
    while chain[-1].fallback is not None and len(chain) <= len(_REGISTRY):
        chain.append(get_transport(chain[-1].fallback))
    return chain


def sender_chain(config: SenderConfig) -> list[TransportSpec]:
    """The fallback chain of ``config.transport``, checked against the rest of it.

    Raises:
        ConfigError: ``changed_only`` with a transport that cannot send each collector
            its own message, or a ``backend`` the transport does not run on.
    """
    chain = fallback_chain(config.transport)
    if config.changed_only and not all(spec.deltas for spec in chain):
        raise ConfigError(f"SenderConfig.changed_only needs a transport that sends each "
                          f"collector its own message (registered with deltas=True, "
                          f"e.g. 'distributed'); transport {config.transport!r} cannot")
    if config.backend not in chain[0].backends:
        raise ConfigError(f"SenderConfig.transport {chain[0].name!r} needs backend "
                          f"{' or '.join(map(repr, chain[0].backends))}, got "
                          f"{config.backend!r}")
    return chain


register_transport(TransportSpec("distributed", sender=DistributedSender,
                                 receiver=DistributedReceiver, deltas=True))
register_transport(TransportSpec("shm", sender=ShmSender, receiver=ShmReceiver,
                                 backends=("gloo",), fallback="distributed",
                                 shared_snapshots=True, lends=True, offer=ShmOffer,
                                 probe=probe_shm))
register_transport(TransportSpec("relay", sender=None, receiver=RelayReceiver,
                                 backends=("gloo",), learner=RelayHub))
