"""A collector's end of the ``"shm"`` transport: the message is the learner's own
shared-memory segment, mapped here and used in place (zero-copy), where a loopback
socket costs a write and a read and a private copy of the weights per collector."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from weight_sync.control.channel import LinkChannel
from weight_sync.errors import PeerGone, ProtocolError
from weight_sync.transports.base import LinkSpec
from weight_sync.wire.shm import SegmentReader, read_token

__all__ = ["ShmReceiver", "probe_shm"]


def probe_shm(params: Mapping[str, str]) -> dict[str, str]:
    """Read the learner's token back from this process's ``/dev/shm`` (empty if this
    process does not see it: another host, container or mount namespace)."""
    token = read_token(params.get("token_file", ""))
    return {} if token is None else {"token": token}


class ShmReceiver:
    """Returns the collector's mapping of the segment each signal names (copy-on-write:
    a policy that writes to its own weights changes private pages, never the
    learner's). The learner signals a segment again only once this collector acked a
    newer version, so the policy never uses a mapping while it is refreshed."""

    def __init__(self, spec: LinkSpec) -> None:
        self.spec = spec
        self._segments = SegmentReader(spec.layout.nbytes)

    def connect(self, channel: LinkChannel, timeout: float) -> None:
        return None

    def receive(self, note: str, buffer: torch.Tensor | None,
                timeout: float) -> torch.Tensor:
        if not note:
            raise ProtocolError(f"{self.spec.who()}: a shared-memory message without its "
                                f"segment name")
        try:
            return self._segments.view(note)
        except FileNotFoundError as exc:
            raise PeerGone(f"{self.spec.who()}: segment {note!r} is gone (learner "
                           f"gone?)") from exc

    def close(self) -> None:
        self._segments.close()
