"""The learner's end of the ``"shm"`` transport: the message already waits in shared
memory (the snapshot pool allocates it there), so sending is naming its segment."""

from __future__ import annotations

from collections.abc import Mapping

from weight_sync.control.channel import LinkChannel
from weight_sync.errors import ProtocolError
from weight_sync.transports.base import LinkSpec
from weight_sync.wire.shm import ShmToken
from weight_sync.wire.snapshots import Snapshot

__all__ = ["ShmSender", "ShmOffer"]


class ShmOffer:
    """Publishes the name of a token file in this host's ``/dev/shm``; accepts the
    collectors that read the token back (they share this memory)."""

    def __init__(self) -> None:
        self._token = ShmToken()
        self.params = {"token_file": self._token.name}

    def accepts(self, evidence: Mapping[str, str]) -> bool:
        return self._token.matches(evidence.get("token"))

    def close(self) -> None:
        self._token.close()


class _Named:
    """A message the collector copies from its segment: nothing left to do here."""

    def __init__(self, segment: str) -> None:
        self.note = segment

    def done(self) -> bool:
        return True

    def finish(self, timeout: float) -> None:
        return None


class ShmSender:
    """Tells the collector which segment holds each message. The collector uses the
    segment in place; the link keeps the snapshot out of the pool until the collector
    acks a newer version, so it is never rewritten while the collector uses it."""

    def __init__(self, spec: LinkSpec) -> None:
        self.spec = spec

    def connect(self, channel: LinkChannel, timeout: float) -> None:
        return None  # the store and the segments suffice

    def send(self, snapshot: Snapshot) -> _Named:
        if snapshot.segment is None:
            raise ProtocolError(f"{self.spec.who()}: the shm transport was handed a "
                                f"snapshot outside shared memory")
        return _Named(snapshot.segment)

    def close(self) -> None:
        return None
