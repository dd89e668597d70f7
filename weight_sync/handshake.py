"""The handshake, both sides, both moments (the initial ``connect()`` and run-time joins).

A collector claims an incarnation of its id, reads the learner's layout and transport
offers, probes the offers, and writes a :class:`~weight_sync.wire.protocol.Hello`; the
learner answers with a :class:`~weight_sync.wire.protocol.Verdict`. The rules are the same
at every moment:

* with a shared secret, a collector that cannot prove it knows it is refused
  (``AuthenticationError``), and a collector with a secret refuses a verdict the
  learner did not prove (:mod:`weight_sync.wire.auth`);
* a collector whose layout differs is refused (``LayoutMismatchError``, listing the
  differences) and raises before any weight moves;
* a collector id already served by a live process on the learner's host is refused
  (``DuplicateCollectorError``);
* otherwise the first transport of the learner's proposal (and its fallbacks) that
  both ends can use is chosen: a transport with an offer only if the collector's
  evidence satisfies it (shared memory only where it really shares ``/dev/shm``, the
  relay only where it reaches the relay's server), and only if the learner can reserve
  what it needs there (room in ``/dev/shm``). The verdict says why (its ``reason``), and
  whether the collector was proven to share the learner's host (``local``: it then
  checks no payload checksum).

The collector raises the refusal; the learner raises it too where it waits for that id
(``connect()``, ``wait_for``), and otherwise logs it and carries on.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

from weight_sync.control.channel import Control
from weight_sync.errors import (
    AuthenticationError,
    ConnectionFailed,
    DuplicateCollectorError,
    LayoutMismatchError,
    WeightSyncError,
)
from weight_sync.transports.base import Offer
from weight_sync.transports.registry import TransportSpec, get_transport, transport_names
from weight_sync.wire.auth import StreamKey, new_nonce
from weight_sync.wire.layout import BufferLayout
from weight_sync.wire.protocol import (
    REFUSED_AUTH,
    REFUSED_DUPLICATE,
    REFUSED_LAYOUT,
    Hello,
    Verdict,
)

__all__ = ["Joined", "Reserve", "join", "judge", "refusal_error", "REFUSED_TRANSPORT"]

if TYPE_CHECKING:
    from weight_sync.learner.sender_link import SenderLink

log = logging.getLogger(__name__)

#: :attr:`Verdict.refusal` of a collector that can use none of the proposed transports.
REFUSED_TRANSPORT = "transport"

#: Asked by :func:`judge` before it places a collector on a transport the collector can
#: use: ``(collector id, hello, transport, proven to share the learner's host, how many
#: collectors judged with it are not)``; reserves what the learner needs for it there
#: and returns ``""``, or says why it cannot (the next transport is tried).
Reserve = Callable[[int, Hello, TransportSpec, bool, int], str]


@dataclasses.dataclass(frozen=True)
class Joined:
    """What a collector holds once admitted (:func:`join`).

    Attributes:
        incarnation: the incarnation of its id it claimed.
        verdict: the learner's admitting verdict (its transport).
        key: with a shared secret, the stream's key; ``None`` without.
        learner_nonce: the admitting learner's nonce: a learner started anew at the
            same address has another one.
    """

    incarnation: int
    verdict: Verdict
    key: StreamKey | None
    learner_nonce: str


def _layout_error(who: str, diffs: list[str] | tuple[str, ...]) -> LayoutMismatchError:
    shown = "\n  ".join(diffs[:50])
    more = f"\n  ... and {len(diffs) - 50} more" if len(diffs) > 50 else ""
    return LayoutMismatchError(f"{who}: weights differ from the learner's in {len(diffs)} "
                               f"place(s):\n  {shown}{more}", list(diffs))


def refusal_error(verdict: Verdict, who: str, differences: tuple[str, ...] = ()) -> WeightSyncError:
    """The typed error of a refused collector (the same on both sides)."""
    if verdict.refusal == REFUSED_LAYOUT:
        return _layout_error(who, differences)
    if verdict.refusal == REFUSED_DUPLICATE:
        return DuplicateCollectorError(f"{who}: refused by the learner: {verdict.reason}")
    if verdict.refusal == REFUSED_AUTH:
        return AuthenticationError(f"{who}: refused by the learner: {verdict.reason}")
    return ConnectionFailed(f"{who}: refused by the learner: {verdict.reason}")


def _probe(offers: Mapping[str, Mapping[str, str]]) -> dict[str, dict[str, str]]:
    """What this process finds probing each offer it knows a transport for."""
    known = set(transport_names())
    evidence: dict[str, dict[str, str]] = {}
    for name, params in offers.items():
        spec = get_transport(name) if name in known else None
        if spec is not None and spec.probe is not None:
            evidence[name] = spec.probe(params)
    return evidence


def join(control: Control, layout: BufferLayout, cid: int, deadline: float,
         secret: bytes | None = None) -> Joined:
    """Collector side: join the stream as collector ``cid``.

    Raises:
        AuthenticationError: with a secret, the learner refused this collector's proof
            or did not prove its verdict; without one, the learner requires a secret.
        LayoutMismatchError: this collector's layout differs (checked here, and the
            learner is told, before anything else happens).
        DuplicateCollectorError: a live process already serves ``cid``.
        WeightSyncTimeout: the learner did not answer before ``deadline``.
    """
    inc = control.join(cid)
    who = f"collector {cid}"
    layout_json, offers, learner_nonce = control.read_stream(deadline - time.monotonic())
    key = None if secret is None else StreamKey(secret, control.name, learner_nonce)
    diffs = layout.differences(layout_json)
    hello = Hello(pid=os.getpid(), host=socket.gethostname(), refused=tuple(diffs),
                  evidence=_probe(offers), nonce=new_nonce())
    if key is not None:
        hello = dataclasses.replace(hello, proof=key.hello_proof(cid, inc, hello))
    control.say_hello(cid, inc, hello)
    if diffs:
        raise _layout_error(who, diffs)
    verdict = control.wait_verdict(cid, inc, deadline - time.monotonic())
    if verdict.refusal == REFUSED_AUTH:
        raise refusal_error(verdict, who)
    if key is not None and not key.verdict_valid(cid, inc, hello.nonce, verdict):
        log.error("%s: the learner's verdict is not authenticated (a learner without the "
                  "secret, or a forged answer): refused", who)
        raise AuthenticationError(f"{who}: the learner's answer does not prove it knows the "
                                  f"shared secret; not connecting")
    if not verdict.admitted:
        raise refusal_error(verdict, who)
    return Joined(inc, verdict, key, learner_nonce)


def judge(hello: Hello, cid: int, inc: int, current: SenderLink | None,
          chain: list[TransportSpec], offers: Mapping[str, Offer],
          key: StreamKey | None = None, reserve: Reserve | None = None,
          peers: Sequence[Hello] = ()) -> Verdict:
    """Learner side: the verdict on collector ``cid``'s incarnation ``inc`` (unsigned:
    the caller signs it with ``key``).

    Args:
        key: with a shared secret, the stream's key: the hello must carry a valid
            proof.
        current: the link that serves ``cid`` now, if any.
        chain: the proposed transport and its fallbacks, in order.
        offers: the learner's offers, by transport name.
        reserve: asked before placing the collector on a transport (``None``: always
            possible).
        peers: the hellos of the other collectors judged together with this one (at
            the initial ``connect()``).
    """
    who = f"collector {cid} (incarnation {inc}, pid {hello.pid} on {hello.host})"
    if key is not None and not key.hello_valid(cid, inc, hello):
        return Verdict(refusal=REFUSED_AUTH,
                       reason=f"{who} did not prove it knows the shared secret "
                              f"({'a wrong proof' if hello.proof else 'no proof'})")
    if hello.refused:
        return Verdict(refusal=REFUSED_LAYOUT,
                       reason=f"{who} has another layout ({len(hello.refused)} differences)")
    if (current is not None and current.failure is None and current.peer_pid is not None
            and current.peer_alive()):
        return Verdict(refusal=REFUSED_DUPLICATE,
                       reason=f"duplicate collector id {cid}: incarnation "
                              f"{current.incarnation} (pid {current.peer_pid}) is alive and "
                              f"served")
    proven = _proven(hello, chain, offers)
    local = any(spec.proves_host and spec.name in proven for spec in chain)
    remote_peers = sum(not any(spec.proves_host and spec.name in _proven(peer, chain, offers)
                               for spec in chain) for peer in peers)
    passed: list[str] = []
    for spec in chain:
        if spec.name in offers and spec.name not in proven:
            found = hello.evidence.get(spec.name)
            passed.append(f"not {spec.name!r}: "
                          + ("its offer was not probed" if found is None else
                             "its probe found nothing" if not found else
                             f"its evidence {sorted(found)} was not accepted"))
            continue
        why_not = "" if reserve is None else reserve(cid, hello, spec, local, remote_peers)
        if why_not:
            passed.append(f"not {spec.name!r}: {why_not}")
            continue
        proof = (f"its probe proved it ({', '.join(sorted(hello.evidence[spec.name]))})"
                 if spec.name in proven else "a transport every collector can use")
        where = "on the learner's host (proven)" if local else f"on host {hello.host}"
        return Verdict(transport=spec.name, local=local,
                       reason="; ".join([f"{spec.name!r}: {proof}, {where}", *passed]))
    return Verdict(refusal=REFUSED_TRANSPORT,
                   reason=f"{who} can use none of the transports "
                          f"{[s.name for s in chain]}: {'; '.join(passed)}")


def _proven(hello: Hello, chain: list[TransportSpec], offers: Mapping[str, Offer]) -> set[str]:
    """The transports of ``chain`` whose offer accepts what ``hello`` found probing it."""
    return {spec.name for spec in chain if spec.name in offers
            and offers[spec.name].accepts(hello.evidence.get(spec.name, {}))}
