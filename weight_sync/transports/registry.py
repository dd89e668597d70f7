"""Transports by name: the built-ins, those pip-installed packages provide, and any a
user registers.

``WeightSender(..., transport="<name>")`` proposes a transport; for each collector the
learner takes the first of that transport and its fallbacks that both ends can use,
and tells the collector which one in its admission verdict. ``transport="auto"`` (the
default) proposes the built-ins best first, each collector placed on the first it can
prove (:func:`sender_chain`). A collector looks the name up in its own registry, which
finds it in one of three places, in this order:

1. registered in this process (:func:`register_transport`);
2. a built-in (``"distributed"``, ``"shm"``, ``"relay"``), imported on first use;
3. an installed package's entry point in the group ``weight_sync.transports`` whose name
   is the transport's and whose object is a :class:`TransportSpec` (or a callable that
   returns one), loaded on first use. Such a transport exists in every process of the
   environment, a freshly spawned collector included, without any import::

       # the plug-in package's pyproject.toml
       [project.entry-points."weight_sync.transports"]
       socket = "ws_socket_transport:SPEC"

Example (in-process)::

    from weight_sync.transports import TransportSpec, register_transport

    register_transport(TransportSpec("pipe", sender=PipeSender, receiver=PipeReceiver))
    sender = WeightSender(policy, 4, transport="pipe")
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

from weight_sync.config import SenderConfig
from weight_sync.errors import ConfigError
from weight_sync.transports.base import (
    LearnerSide,
    LinkSpec,
    Offer,
    ReceiverTransport,
    SenderTransport,
)

__all__ = ["AUTO", "ENTRY_POINT_GROUP", "LinkCapabilities", "TransportSpec",
           "fallback_chain", "get_transport", "register_transport", "sender_chain",
           "transport_names"]

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "weight_sync.transports"
"""The entry-point group an installed package provides transports through."""

# name -> "module:attribute" of the built-ins, imported on first use.
_BUILTINS = {name: f"weight_sync.transports.builtins:{name}"
             for name in ("distributed", "shm", "relay")}

AUTO = "auto"
"""The proposal that places each collector on the best built-in it can prove; not a
transport of its own (no verdict names it)."""
# Best first: zero-copy where /dev/shm is shared, one copy per host across hosts, then
# a copy per collector, which every collector can use.
_AUTO_ORDER = ("shm", "relay", "distributed")


@dataclass(frozen=True)
class LinkCapabilities:
    """What a transport's ends do on one link (from :meth:`TransportSpec.capabilities`).

    Attributes:
        streams: the learner's end may be given a snapshot still being packed and the
            collector's end reports each piece as it lands (the ends implement
            :class:`~weight_sync.transports.base.StreamingSender` /
            :class:`~weight_sync.transports.base.StreamingReceiver`).
        posts_early: the collector's end can post the receive of the next whole message
            before its signal (:class:`~weight_sync.transports.base.EarlyReceiver`).
    """

    streams: bool = False
    posts_early: bool = False


@dataclass(frozen=True)
class TransportSpec:
    """A registered transport, and every capability it has, declared here and nowhere
    else.

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
            :class:`Offer` published to collectors, given the transport's
            :class:`LearnerSide` (``None`` if it has none) (``None``: every collector
            can).
        probe: collector side: what it finds probing the offer's parameters (bounded:
            it runs while the collector joins).
        proves_host: a collector whose evidence its offer accepts shares the learner's
            host: what the learner sends it goes memory to memory through one kernel,
            so it skips payload checksums on whatever transport it is placed.
        deltas: each link carries its own messages, of any size: the learner's end sends
            whatever ``buffer`` it is given, the collector's end fills the buffer it is
            given whatever its size. Only such a transport can carry changed-only
            messages (``SenderConfig.changed_only``), whose size and content differ per
            collector; one shared write (``"shm"``) or one stream for all (``"relay"``)
            cannot.
        streams: per link, whether its ends stream messages in pieces
            (:class:`LinkCapabilities`); ``None``: never.
        posts_early: per link, whether the collector's end posts receives early;
            ``None``: never.
    """

    name: str
    sender: Callable[[LinkSpec], SenderTransport] | None
    receiver: Callable[[LinkSpec], ReceiverTransport]
    backends: tuple[str, ...] = ("gloo", "nccl")
    fallback: str | None = None
    shared_snapshots: bool = False
    lends: bool = False
    offer: Callable[[LearnerSide | None], Offer] | None = None
    probe: Callable[[Mapping[str, str]], dict[str, str]] | None = None
    proves_host: bool = False
    learner: Callable[[SenderConfig], LearnerSide] | None = None
    deltas: bool = False
    streams: Callable[[LinkSpec], bool] | None = None
    posts_early: Callable[[LinkSpec], bool] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or " " in self.name:
            raise ConfigError(f"TransportSpec.name must be a non-empty string without "
                              f"spaces, got {self.name!r}")
        if self.name == AUTO:
            raise ConfigError(f"TransportSpec.name {AUTO!r} is reserved (the proposal "
                              f"that picks a built-in per collector)")
        if self.proves_host and self.offer is None:
            raise ConfigError(f"transport {self.name!r}: proves_host needs an offer")
        if self.fallback == self.name:
            raise ConfigError(f"transport {self.name!r} cannot fall back to itself")
        if (self.sender is None) == (self.learner is None):
            raise ConfigError(f"transport {self.name!r}: give either sender or learner")
        if (self.offer is None) != (self.probe is None):
            raise ConfigError(f"transport {self.name!r}: give both offer and probe, or "
                              f"neither")

    def capabilities(self, link: LinkSpec) -> LinkCapabilities:
        """What this transport's ends do on ``link``."""
        return LinkCapabilities(
            streams=self.streams is not None and self.streams(link),
            posts_early=self.posts_early is not None and self.posts_early(link))


_REGISTRY: dict[str, TransportSpec] = {}


def _installed() -> dict[str, Any]:
    """The entry points of installed transport packages, by name."""
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def _load(name: str) -> TransportSpec | None:
    """Load the built-in or installed transport ``name`` into the registry."""
    if name in _BUILTINS:
        module, attribute = _BUILTINS[name].split(":")
        spec = getattr(importlib.import_module(module), attribute)
    else:
        ep = _installed().get(name)
        if ep is None:
            return None
        try:
            spec = ep.load()
            if not isinstance(spec, TransportSpec) and callable(spec):
                spec = spec()
        except Exception as exc:
            raise ConfigError(f"transport {name!r} from entry point {ep.value!r} (group "
                              f"{ENTRY_POINT_GROUP!r}) failed to load: {exc!r}") from exc
        if not isinstance(spec, TransportSpec) or spec.name != name:
            raise ConfigError(f"entry point {name!r} = {ep.value!r} (group "
                              f"{ENTRY_POINT_GROUP!r}) must give a TransportSpec named "
                              f"{name!r}, got {spec!r}")
        log.debug("transport %r loaded from entry point %s", name, ep.value)
    if spec.fallback is not None:
        get_transport(spec.fallback)
    _REGISTRY.setdefault(name, spec)
    return _REGISTRY[name]


def register_transport(spec: TransportSpec, *, replace: bool = False) -> None:
    """Make ``spec`` available by its name, in this process.

    Raises:
        ConfigError: the name is taken by a registered, built-in or installed transport
            (unless ``replace``), or its fallback unknown.
    """
    if not isinstance(spec, TransportSpec):
        raise ConfigError(f"register_transport takes a TransportSpec, got {spec!r}")
    if not replace and spec.name in transport_names():
        raise ConfigError(f"a transport named {spec.name!r} is already registered")
    if spec.fallback is not None and spec.fallback not in transport_names():
        raise ConfigError(f"transport {spec.name!r} falls back to {spec.fallback!r}, "
                          f"which is not registered")
    _REGISTRY[spec.name] = spec


def get_transport(name: str) -> TransportSpec:
    """The transport known as ``name`` (loading a built-in or installed one).

    Raises:
        ConfigError: no such transport (the known names are listed).
    """
    if not isinstance(name, str):
        raise ConfigError(f"a transport name must be a string, got {name!r}")
    spec = _REGISTRY.get(name) or _load(name)
    if spec is None:
        raise ConfigError(f"unknown transport {name!r}; registered: {transport_names()} (an "
                          f"installed one needs an entry point in group "
                          f"{ENTRY_POINT_GROUP!r})")
    return spec


def transport_names() -> list[str]:
    """Every transport known to this process, loaded or not."""
    return sorted({*_REGISTRY, *_BUILTINS, *_installed()})


def fallback_chain(name: str) -> list[TransportSpec]:
    """``name``'s spec, then its fallback's, and so on."""
    chain = [get_transport(name)]
    while chain[-1].fallback is not None and len(chain) <= len(transport_names()):
        chain.append(get_transport(chain[-1].fallback))
    return chain


def sender_chain(config: SenderConfig) -> list[TransportSpec]:
    """The transports the learner proposes, best first.

    ``"auto"``: shared memory, the relay, then direct sends, less those that cannot
    run on ``config.backend`` or carry ``changed_only`` messages (on ``"nccl"``, or with
    ``changed_only``, only direct sends are left). A name: that transport's fallback
    chain, checked against the rest of the config.

    Raises:
        ConfigError: ``changed_only`` with a transport that cannot send each collector
            its own message, or a ``backend`` the transport does not run on.
    """
    if config.transport == AUTO:
        return [spec for spec in map(get_transport, _AUTO_ORDER)
                if config.backend in spec.backends and (spec.deltas or not config.changed_only)]
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
