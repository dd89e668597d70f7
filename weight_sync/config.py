"""Settings of the sender and the receiver, and what crosses process boundaries.

Only :class:`ConnectionInfo` (a small frozen, picklable dataclass) travels from the
learner to a collector process; each side builds its live objects itself.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field

import torch

from weight_sync.errors import ConfigError

__all__ = ["ConnectionInfo", "SenderConfig", "ReceiverConfig", "RelayConfig", "BACKENDS",
           "WIRE_DTYPES", "wire_dtype", "check_timeout", "check_count"]


def wire_dtype(name: str) -> torch.dtype | None:
    """The dtype a ``wire_dtype`` setting names (``""``: none, leaves travel as is)."""
    return WIRE_DTYPES[name] if name else None

#: torch.distributed backends a link can use.
BACKENDS = ("gloo", "nccl")
#: Narrower dtypes float32 leaves may travel as (``SenderConfig.wire_dtype``).
WIRE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def _positive(owner: str, name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not (
        value > 0 and math.isfinite(value)
    ):
        raise ConfigError(f"{owner}.{name} must be a positive finite number of seconds, "
                          f"got {value!r}")


def check_timeout(what: str, value: object, *, zero: bool = True) -> float:
    """``value`` as a timeout argument of ``what``: a finite number of seconds, ``>= 0``
    (``> 0`` unless ``zero``).

    Raises:
        ConfigError: anything else (``None``, a bool, NaN, infinity, a negative number),
            quoting it.
    """
    if (not isinstance(value, (int, float)) or isinstance(value, bool)
            or not math.isfinite(value) or value < 0 or (value == 0 and not zero)):
        bound = ">= 0" if zero else "> 0"
        raise ConfigError(f"{what}: timeout must be a finite number of seconds {bound}, "
                          f"got {value!r}")
    return float(value)


def check_count(what: str, value: object, least: int) -> int:
    """``value`` as an integer argument of ``what`` (an id, a count) ``>= least``; a bool
    is not one.

    Raises:
        ConfigError: quoting the value.
    """
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise ConfigError(f"{what} must be an int >= {least}, got {value!r}")
    return value


def _name(owner: str, value: str) -> None:
    if not isinstance(value, str) or not value or "/" in value:
        raise ConfigError(f"{owner}.name must be a non-empty string without '/', got {value!r}")


@dataclass(frozen=True)
class RelayConfig:
    """How ``transport="relay"`` arranges and paces its collectors
    (:mod:`weight_sync.transports.relay_plan` explains the topology)."""

    fanout: int = 1
    """Children of the learner and of each host's head: 1 is a chain (one copy per link
    and version whatever the number of hosts), more is a tree (less depth, ``fanout``
    copies on each head's link)."""
    chunk_bytes: int = 4 << 20
    """Largest piece a node forwards at once (it forwards whatever has arrived, up to
    this)."""
    stall_s: float = 2.0
    """A collector whose parent sends nothing for this long takes the rest of the
    version from the learner, and the parent is marked slow (a leaf from then on)."""
    patience_s: float = 10.0
    """A collector that has waited this long in all for the bytes of a parent that is
    still sending does the same (time spent waiting on the parent, not on its own
    work): a slow relay delays the hosts below it by at most this much, once."""

    def __post_init__(self) -> None:
        if not isinstance(self.fanout, int) or isinstance(self.fanout, bool) or self.fanout < 1:
            raise ConfigError(f"RelayConfig.fanout must be an int >= 1, got {self.fanout!r}")
        if (not isinstance(self.chunk_bytes, int) or isinstance(self.chunk_bytes, bool)
                or self.chunk_bytes < 4096):
            raise ConfigError(f"RelayConfig.chunk_bytes must be an int >= 4096, "
                              f"got {self.chunk_bytes!r}")
        _positive("RelayConfig", "stall_s", self.stall_s)
        _positive("RelayConfig", "patience_s", self.patience_s)


@dataclass(frozen=True)
class SenderConfig:
    """How the learner's :class:`~weight_sync.WeightSender` listens and waits."""

    host: str = "127.0.0.1"
    """Interface the store binds. Loopback unless you bind another one explicitly."""
    port: int = 0
    """Store port; 0 picks a free one (read it back from ``connection_info``)."""
    name: str = "policy"
    """Name of the weight stream; several streams can share one store."""
    backend: str = "gloo"
    """``"gloo"`` (CPU tensors) or ``"nccl"`` (CUDA tensors)."""
    timeout: float = 60.0
    """Bound on each store operation and on one transfer, in seconds."""
    liveness_timeout: float = 10.0
    """A collector whose heartbeat stopped this long while the learner waits for its
    ack is declared failed (``CollectorFailed``). Collectors beat every tenth of it."""
    transport: str = "auto"
    """The registered transport to propose (:mod:`weight_sync.transports.registry`).
    ``"auto"`` (the default) places each collector, at its admission, on the best one it
    proves it can use: ``"shm"`` if it shares this host's ``/dev/shm`` (it reads back a
    token the learner wrote there) and ``/dev/shm`` has room for the snapshots'
    bound; else ``"relay"`` if it runs on another host and reaches the relay's port;
    else ``"distributed"``. With ``backend="nccl"`` or ``changed_only``, always
    ``"distributed"``. A name forces that transport (and its fallbacks):
    ``"distributed"`` (gloo/nccl sends to each collector), ``"shm"`` (collectors that
    share this host's ``/dev/shm`` use each message in place, the others fall back to
    sends; gloo only), ``"relay"`` (the learner sends each version once; collectors
    forward it host to host while it arrives, see :class:`RelayConfig`; gloo only), or
    one of your own. ``WeightSender.transports`` says where each collector was placed."""
    wire_dtype: str = ""
    """``"bfloat16"`` or ``"float16"``: float32 leaves travel in that dtype (half the
    bytes) and are widened on arrival; other leaves travel untouched. Rounding is to
    nearest: a received value is within a relative ``2**-8`` (bfloat16) or ``2**-11``
    (float16) of the learner's, for normal numbers of the wire dtype (bfloat16 has
    float32's range; float16's normal range is 6.1e-5 to 65504: larger values become
    inf, smaller ones lose relative precision).
    Collectors then copy each message into their policy (no zero-copy). ``""``: off."""
    relay: RelayConfig = dataclasses.field(default_factory=RelayConfig)
    """Settings of ``transport="relay"``."""
    changed_only: bool = False
    """Send each collector only the leaves whose bytes changed since the version it
    holds (frozen encoders, unchanged buffers); it still ends up bit-exact to the
    learner's version, checked on the whole message before apply
    (:mod:`weight_sync.wire.delta`). Whole messages for the initial sync, (re)joins and
    resends. Needs a transport that carries a message per collector (``"distributed"``;
    not ``"shm"`` nor ``"relay"``) on ``"gloo"``; costs each link one buffer of a message
    on the learner and each collector one more."""
    checksum: bool = True
    """Stamp each message with a checksum of its payload, which collectors verify before
    applying it (a corrupted message is refused and sent again): XXH3-64 with the
    ``fast`` extra, about 0.05 ms per MB on each side (1.8 ms per 40 MB message here);
    CRC-32 without it, about 0.5 ms per MB. ``False`` to skip it. With a secret, the
    signed digest of each message (BLAKE3, or SHA-256 without ``fast``) takes its
    place."""
    secret: str | bytes = field(default="", repr=False)
    """A secret shared with the collectors (``""``: the environment variable
    ``WEIGHT_SYNC_SECRET``, if set). With one, only collectors that prove they know it
    are admitted and every message is authenticated; without, the network is trusted.
    Never sent, logged, or shown in a ``repr``."""

    def __post_init__(self) -> None:
        if not isinstance(self.changed_only, bool):
            raise ConfigError(f"SenderConfig.changed_only must be a bool, "
                              f"got {self.changed_only!r}")
        if self.changed_only and self.backend != "gloo":
            raise ConfigError(f"SenderConfig.changed_only needs backend 'gloo' (CPU "
                              f"buffers), got {self.backend!r}")
        if not isinstance(self.checksum, bool):
            raise ConfigError(f"SenderConfig.checksum must be a bool, got {self.checksum!r}")
        if not isinstance(self.secret, (str, bytes)):
            raise ConfigError(f"SenderConfig.secret must be str or bytes, got a "
                              f"{type(self.secret).__name__}")
        if not isinstance(self.host, str) or not self.host:
            raise ConfigError(f"SenderConfig.host must be a non-empty string, got {self.host!r}")
        if not isinstance(self.port, int) or isinstance(self.port, bool) or not (
                0 <= self.port <= 65535):
            raise ConfigError(f"SenderConfig.port must be an int in [0, 65535], got {self.port!r}")
        _name("SenderConfig", self.name)
        if self.backend not in BACKENDS:
            raise ConfigError(f"SenderConfig.backend must be one of {BACKENDS}, "
                              f"got {self.backend!r}")
        _positive("SenderConfig", "timeout", self.timeout)
        _positive("SenderConfig", "liveness_timeout", self.liveness_timeout)
        if not isinstance(self.transport, str) or not self.transport:
            raise ConfigError(f"SenderConfig.transport must be a transport name, "
                              f"got {self.transport!r}")
        if self.wire_dtype != "" and self.wire_dtype not in WIRE_DTYPES:
            raise ConfigError(f"SenderConfig.wire_dtype must be '' or one of "
                              f"{sorted(WIRE_DTYPES)}, got {self.wire_dtype!r}")
        if not isinstance(self.relay, RelayConfig):
            raise ConfigError(f"SenderConfig.relay must be a RelayConfig, got {self.relay!r}")


@dataclass(frozen=True)
class ReceiverConfig:
    """How a collector's :class:`~weight_sync.WeightReceiver` waits."""

    timeout: float = 60.0
    """Bound on each store operation and on one transfer, in seconds."""
    idle_slice: float = 30.0
    """Backstop on one wait of the background thread for the next update. ``close()``
    and the learner's death wake that wait at once, so this only bounds a wait whose
    wake-up was lost; it does not limit how long a learner may stay silent. (Each
    expiry makes torch's store log a "waitForInput ... timed out" warning.)"""
    learner_timeout: float = 10.0
    """``receive_weights`` raises ``PeerGone`` once the learner gave no sign of life
    (its background heartbeat, read through its store) for this long: a frozen
    learner, a cut link or a vanished host, not only a closed socket. Must exceed the
    learner's beat interval (``ConnectionInfo.heartbeat_s``, 1 s by default)."""
    reattach_timeout: float = 0.0
    """``0`` (the default): a lost learner ends the stream (``receive_weights`` raises
    ``PeerGone``). ``> 0``: once ``receive_weights`` sees the learner lost (its store
    gone, or silent for ``learner_timeout``), this collector keeps its weights and, in
    the background, waits up to this many seconds for a new learner at the same address
    and stream, joins it again (secret and layout checked anew) and applies its initial
    weights, which a later ``receive_weights`` returns; ``PeerGone`` naming the address
    if none answers in time (at most 5 s later when the process found there is frozen).
    A learner that closes the stream (``ClosedError``) is not waited for."""
    accept_rewind: bool = False
    """With ``reattach_timeout``: what to do with a new learner whose first version is
    lower than the one applied here (it resumed from an older checkpoint). ``False``
    refuses it (``ProtocolError`` naming both versions; nothing applied, the stream
    ends); ``True`` applies it as a new epoch (``WeightReceiver.epoch``; versions then
    grow again from there). A version equal or higher is always accepted."""
    secret: str | bytes = field(default="", repr=False)
    """The secret shared with the learner (``""``: the environment variable
    ``WEIGHT_SYNC_SECRET``, if set). With one, this collector proves it at its join,
    accepts only a learner that proves it too, and applies only authenticated messages.
    Never sent, logged, or shown in a ``repr``."""

    def __post_init__(self) -> None:
        _positive("ReceiverConfig", "timeout", self.timeout)
        _positive("ReceiverConfig", "idle_slice", self.idle_slice)
        _positive("ReceiverConfig", "learner_timeout", self.learner_timeout)
        if (not isinstance(self.reattach_timeout, (int, float))
                or isinstance(self.reattach_timeout, bool)
                or not (self.reattach_timeout >= 0 and math.isfinite(self.reattach_timeout))):
            raise ConfigError(f"ReceiverConfig.reattach_timeout must be a finite number of "
                              f"seconds >= 0 (0: off), got {self.reattach_timeout!r}")
        if not isinstance(self.accept_rewind, bool):
            raise ConfigError(f"ReceiverConfig.accept_rewind must be a bool, "
                              f"got {self.accept_rewind!r}")
        if not isinstance(self.secret, (str, bytes)):
            raise ConfigError(f"ReceiverConfig.secret must be str or bytes, got a "
                              f"{type(self.secret).__name__}")


@dataclass(frozen=True)
class ConnectionInfo:
    """Everything a collector needs to reach the learner. Small, frozen, picklable."""

    host: str
    port: int
    name: str
    num_collectors: int
    backend: str = "gloo"
    max_collectors: int = 0
    """Collector ids accepted are ``0..max_collectors-1`` (0 means ``num_collectors``)."""
    heartbeat_s: float = 1.0
    """How often a collector beats (the learner's ``liveness_timeout`` / 10)."""
    wire_dtype: str = ""
    """The dtype float32 leaves travel as (``SenderConfig.wire_dtype``)."""
    changed_only: bool = False
    """The learner may send changed-only messages (``SenderConfig.changed_only``)."""

    def __post_init__(self) -> None:
        if not isinstance(self.port, int) or isinstance(self.port, bool) or not (
                0 < self.port <= 65535):
            raise ConfigError(f"ConnectionInfo.port must be in [1, 65535], got {self.port!r}")
        _name("ConnectionInfo", self.name)
        if self.backend not in BACKENDS:
            raise ConfigError(f"ConnectionInfo.backend must be one of {BACKENDS}, "
                              f"got {self.backend!r}")
        if (not isinstance(self.num_collectors, int) or isinstance(self.num_collectors, bool)
                or self.num_collectors < 1):
            raise ConfigError(f"ConnectionInfo.num_collectors must be >= 1, "
                              f"got {self.num_collectors!r}")
        _positive("ConnectionInfo", "heartbeat_s", self.heartbeat_s)
        if not isinstance(self.changed_only, bool):
            raise ConfigError(f"ConnectionInfo.changed_only must be a bool, "
                              f"got {self.changed_only!r}")
        if self.wire_dtype != "" and self.wire_dtype not in WIRE_DTYPES:
            raise ConfigError(f"ConnectionInfo.wire_dtype must be '' or one of "
                              f"{sorted(WIRE_DTYPES)}, got {self.wire_dtype!r}")
        if self.max_collectors == 0:
            object.__setattr__(self, "max_collectors", self.num_collectors)
        if (not isinstance(self.max_collectors, int) or isinstance(self.max_collectors, bool)
                or self.max_collectors < self.num_collectors):
            raise ConfigError(f"ConnectionInfo.max_collectors must be >= num_collectors, "
                              f"got {self.max_collectors!r}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ConnectionInfo:
        """Parse :meth:`to_json`'s output (fields it does not know are refused)."""
        try:
            fields = json.loads(text)
            return cls(**fields)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"not a ConnectionInfo: {text[:200]!r} ({exc})") from exc
