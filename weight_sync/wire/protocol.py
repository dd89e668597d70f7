"""What weight-sync keeps in the TCPStore: every key, and every structured value.

Only :mod:`weight_sync.control.channel` reads and writes these keys; this module says what
they are called and how their values are spelled, so a value is formatted and parsed
in one place (the ``encode``/``decode`` pair of its dataclass).

All keys live under the prefix ``ws/<name>/`` (one namespace per weight stream, so one
store can carry several). ``<cid>`` is a collector id, ``<inc>`` its incarnation (1 for
its first connect, +1 each time a process with that id joins again), ``<seq>`` the
per-link message number (0 = the initial sync), ``<v>`` a weight version.

===============================  =========  =========  ==================================
key                              written by read by    meaning
===============================  =========  =========  ==================================
``layout``                       learner    collector  JSON layout (name, shape, dtype)
``info``                         learner    collector  JSON ConnectionInfo, for collectors
                                                       started with only an address
``offers``                       learner    collector  JSON {transport: params}: what a
                                                       collector must prove to use one
``nonce``                        learner    collector  this learner's fresh nonce (binds
                                                       join proofs and message MACs to it)
``beat``                         learner    collector  the learner's heartbeat counter,
                                                       ``add(+1)`` per beat (a background
                                                       thread: a busy learner still beats)
``join/<cid>``                   collector  learner    counter; ``add(+1)`` = incarnation
``joins``                        collector  learner    counter of all joins (cheap to poll)
``hello/<cid>/<inc>``            collector  learner    :class:`Hello` (JSON); the learner
                                                       deletes it once judged
``admit/<cid>/<inc>``            learner    collector  :class:`Verdict` (JSON); the collector
                                                       deletes it once read (none is
                                                       written to a hello listing layout
                                                       differences: it waits for none)
``link/<cid>/<inc>/...``         both ends  both ends  the transport's own rendezvous (the
                                                       gloo pair group's keys, or fields a
                                                       transport publishes)
``update/<cid>/<inc>/<seq>``     learner,   collector  :class:`Update`: message seq carries
                                 collector             version v (and the transport's note,
                                                       the changed leaves of a changed-only
                                                       message, and with a secret its
                                                       digest and MAC);
                                                       ``-1`` = closed (written by the
                                                       learner, or by the collector's own
                                                       ``close()`` to wake its listener)
``ack/<cid>/<inc>/<v>``          collector  learner    version v is applied
``resend/<cid>/<inc>/<seq>``     collector  learner    message seq failed its checksum: send
                                                       its version again (as seq+1); the
                                                       learner deletes the key as it reads it
``alive/<cid>/<inc>``            collector  learner    heartbeat counter, ``add(+1)`` per beat;
                                                       :data:`LEFT` added when it closes
``bye/<cid>/<inc>``              collector  learner    the collector reads no more (it read
                                                       the learner's close, or closed)
===============================  =========  =========  ==================================

A collector waits for ``update/.../<seq>`` with a blocking ``get`` (bounded), then
receives exactly one message through its transport. The learner sends message
``seq+1`` only once ``seq`` is acked, so a transfer never waits on a busy collector and
a slow collector is handed the newest version, never a queue of old ones. It also
means that when message ``seq+1`` arrives, ``update/<seq>`` and the previous message's
``ack`` have been read: the collector deletes them then, off the latency path, so a
long run keeps a bounded number of keys per collector.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from weight_sync.errors import ProtocolError

__all__ = ["CLOSED", "LEFT", "MAX_RESENDS", "Keys", "Hello", "Verdict", "Update",
           "REFUSED_LAYOUT", "REFUSED_DUPLICATE", "REFUSED_AUTH", "REFUSED_PROTOCOL"]

#: Version carried by an ``update`` that ends the stream.
CLOSED = -1
#: Added to a heartbeat counter by a collector that closes: the counter goes negative.
LEFT = -(1 << 40)
#: :attr:`Verdict.refusal` kinds.
REFUSED_LAYOUT = "layout"
REFUSED_DUPLICATE = "duplicate"
REFUSED_AUTH = "auth"
#: A :attr:`Verdict.refusal`: what was written as the hello could not be read.
REFUSED_PROTOCOL = "protocol"
#: How often in a row a collector asks for a message again after a failed checksum
#: (and a learner sends one version again) before the link fails.
MAX_RESENDS = 3


def _decode_json(what: str, raw: bytes) -> dict[str, Any]:
    try:
        value = json.loads(raw.decode())
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f"malformed {what} in the store: {raw[:200]!r}") from exc
    if not isinstance(value, dict):
        raise ProtocolError(f"malformed {what} in the store: {raw[:200]!r}")
    return value


@dataclass(frozen=True)
class Hello:
    """A collector incarnation introducing itself to the learner.

    Attributes:
        pid: its process id (checked for liveness when it runs on the learner's host).
        host: its hostname.
        refused: the layout differences it found, if it refused the learner's layout.
        evidence: per offered transport, what it found when probing the offer (e.g.
            the token it read from the learner's shared memory).
        nonce: the collector's fresh nonce for this join.
        proof: with a shared secret, the HMAC over the rest (``""`` without).
    """

    pid: int
    host: str
    refused: tuple[str, ...] = ()
    evidence: dict[str, dict[str, str]] = field(default_factory=dict)
    nonce: str = ""
    proof: str = ""

    def signed_body(self) -> str:
        """Every field but the proof, canonically (what the proof covers)."""
        body = {**asdict(self), "refused": list(self.refused)}
        del body["proof"]
        return json.dumps(body, sort_keys=True)

    def encode(self) -> str:
        return json.dumps({**asdict(self), "refused": list(self.refused)})

    @classmethod
    def decode(cls, raw: bytes) -> Hello:
        value = _decode_json("hello", raw)
        try:
            return cls(pid=int(value["pid"]), host=str(value["host"]),
                       refused=tuple(value.get("refused") or ()),
                       evidence=dict(value.get("evidence") or {}),
                       nonce=str(value.get("nonce", "")), proof=str(value.get("proof", "")))
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"malformed hello in the store: {raw[:200]!r}") from exc


@dataclass(frozen=True)
class Verdict:
    """The learner's answer to a :class:`Hello`.

    Attributes:
        transport: the transport the link uses (empty when refused).
        refusal: ``""`` when admitted, else :data:`REFUSED_LAYOUT` or
            :data:`REFUSED_DUPLICATE`.
        reason: why it was refused, for the collector's error message; for an
            admitted one, why it was placed on its transport.
        proof: with a shared secret, the HMAC over the rest and the hello's nonce.
        local: the learner proved the collector shares its host (the bytes go memory to
            memory through one kernel): the collector checks no payload checksum.
    """

    transport: str = ""
    refusal: str = ""
    reason: str = ""
    proof: str = ""
    local: bool = False

    @property
    def admitted(self) -> bool:
        return not self.refusal

    def signed_body(self) -> str:
        """Every field but the proof, canonically (what the proof covers)."""
        return json.dumps([self.transport, self.refusal, self.reason, self.local])

    def encode(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def decode(cls, raw: bytes) -> Verdict:
        value = _decode_json("admission verdict", raw)
        local = value.pop("local", False)
        try:
            if not isinstance(local, bool):
                raise TypeError(f"local must be a bool, got {local!r}")
            return cls(**{k: str(v) for k, v in value.items()}, local=local)
        except TypeError as exc:
            raise ProtocolError(f"malformed admission verdict: {raw[:200]!r}") from exc


@dataclass(frozen=True)
class Update:
    """Message ``seq`` of a link carries ``version``; ``note`` is the transport's own
    detail (e.g. the shared-memory segment holding it), ``""`` if it needs none. With a
    shared secret, ``digest`` is the message's digest (``"<algorithm>:<hex>"``) and
    ``tag`` the HMAC of the signal (:class:`~weight_sync.wire.auth.StreamKey`).

    Spelled ``<version>[@<delta>][/<tag>/<digest>][ <note>]``."""

    version: int
    note: str = ""
    digest: str = ""
    tag: str = ""
    delta: str = ""
    """``""`` for a whole message; else the message carries only the leaves that changed
    since the version the collector holds (:class:`weight_sync.wire.delta.DeltaSpec`)."""

    @property
    def closed(self) -> bool:
        return self.version == CLOSED

    def encode(self) -> str:
        version = f"{self.version}@{self.delta}" if self.delta else str(self.version)
        head = f"{version}/{self.tag}/{self.digest}" if self.tag else version
        return f"{head} {self.note}" if self.note else head

    @classmethod
    def decode(cls, raw: bytes) -> Update:
        head, _, note = raw.decode(errors="replace").partition(" ")
        version, _, signature = head.partition("/")
        version, _, delta = version.partition("@")
        tag, _, digest = signature.partition("/")
        try:
            return cls(int(version), note, digest=digest, tag=tag, delta=delta)
        except ValueError as exc:
            raise ProtocolError(f"malformed update signal in the store: {raw[:200]!r}") from exc


class Keys:
    """Key names of one weight stream. The only place that spells a key."""

    def __init__(self, name: str) -> None:
        self.prefix = f"ws/{name}/"

    @property
    def layout(self) -> str:
        return self.prefix + "layout"

    @property
    def info(self) -> str:
        return self.prefix + "info"

    @property
    def offers(self) -> str:
        return self.prefix + "offers"

    @property
    def nonce(self) -> str:
        return self.prefix + "nonce"

    @property
    def beat(self) -> str:
        return self.prefix + "beat"

    @property
    def joins(self) -> str:
        return self.prefix + "joins"

    def join(self, cid: int) -> str:
        return f"{self.prefix}join/{cid}"

    def hello(self, cid: int, inc: int) -> str:
        return f"{self.prefix}hello/{cid}/{inc}"

    def admit(self, cid: int, inc: int) -> str:
        return f"{self.prefix}admit/{cid}/{inc}"

    def link(self, cid: int, inc: int) -> str:
        """Prefix of a link's transport-owned keys (ends with ``/``)."""
        return f"{self.prefix}link/{cid}/{inc}/"

    def update(self, cid: int, inc: int, seq: int) -> str:
        return f"{self.prefix}update/{cid}/{inc}/{seq}"

    def ack(self, cid: int, inc: int, version: int) -> str:
        return f"{self.prefix}ack/{cid}/{inc}/{version}"

    def resend(self, cid: int, inc: int, seq: int) -> str:
        return f"{self.prefix}resend/{cid}/{inc}/{seq}"

    def alive(self, cid: int, inc: int) -> str:
        return f"{self.prefix}alive/{cid}/{inc}"

    def bye(self, cid: int, inc: int) -> str:
        return f"{self.prefix}bye/{cid}/{inc}"
