"""A collector's end of ``transport="relay"``: :class:`RelayReceiver`.

It fetches each version from the parent the learner named in the update's note, into
a slot its own server streams on to its children at the same time (pipelined), and
copies each piece into the receiver's buffer as it lands. A parent that sends nothing
for ``stall_s``, is still sending after ``patience_s``, closes, or does not hold the
version is left: the rest of the version (from the offset reached) comes from the
learner, which then marks that parent slow.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time

import torch

from weight_sync.control import LinkChannel
from weight_sync.errors import PeerGone, ProtocolError
from weight_sync.transports.base import LinkSpec
from weight_sync.transports.relay_plan import LEARNER
from weight_sync.transports.relay_sender import Assignment, HubInfo
from weight_sync.transports.relay_wire import (
    UNAVAILABLE,
    RelayServer,
    Request,
    Slot,
    Slots,
    recv_size,
)

__all__ = ["RelayReceiver"]

log = logging.getLogger(__name__)


class _SourceFailed(Exception):
    """The node being fetched from let this collector down (why, in the message)."""


class RelayReceiver:
    """Receives versions from its assigned parent and serves them to its children."""

    def __init__(self, spec: LinkSpec) -> None:
        self.spec = spec
        self._slots = Slots(spec.layout.nbytes)
        self._hub: HubInfo | None = None
        self._server: RelayServer | None = None

    def connect(self, channel: LinkChannel, timeout: float) -> None:
        self._hub = hub = HubInfo.decode(channel.read("hub", timeout))
        # Where the learner's store is reached from: the address other hosts reach us on.
        address = self.spec.bind_host or "0.0.0.0"
        self._server = RelayServer(self._slots, address, stall_s=hub.stall_s,
                                   chunk_bytes=hub.chunk_bytes)
        channel.publish("node", f"{socket.gethostname()} {address} {self._server.address[1]}")

    def receive(self, note: str, buffer: torch.Tensor | None,
                timeout: float) -> torch.Tensor:
        assert self._hub is not None and buffer is not None, "receive before connect"
        told = Assignment.decode(note)
        deadline = time.monotonic() + timeout
        slot = self._slots.claim(told.version)
        ok = False
        try:
            sources = [told] if told.parent == LEARNER else [
                told, Assignment(told.version, LEARNER, self._hub.host, self._hub.port)]
            for source in sources:
                try:
                    self._fetch(source, told.parent, slot, buffer, deadline)
                    ok = True
                    break
                except _SourceFailed as exc:
                    if source.parent == LEARNER:
                        raise PeerGone(f"{self.spec.who()}: relay fetch of version "
                                       f"{told.version} from the learner failed: {exc}") \
                            from None
                    log.warning("%s: parent collector %d: %s; taking the rest of version "
                                "%d from the learner", self.spec.who(), source.parent, exc,
                                told.version)
        finally:
            self._slots.end(slot, ok)
        return buffer

    def _fetch(self, source: Assignment, told_parent: int, slot: Slot,
               buffer: torch.Tensor, deadline: float) -> None:
        """Fill ``slot`` (and ``buffer``) from ``source``, from where it stands."""
        assert self._hub is not None
        hub, nbytes = self._hub, self._slots.nbytes
        # Patience counts only the time spent waiting on the parent's bytes, not this
        # collector's own (a slow child must not blame its parent).
        patience = None if source.parent == LEARNER else hub.patience_s
        waited = 0.0
        out = buffer.numpy().data
        try:
            remaining = deadline - time.monotonic()
            with socket.create_connection((source.host, source.port),
                                          timeout=min(hub.stall_s, max(remaining, 0.001))
                                          ) as sock:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.sendall(Request(self.spec.collector_id, told_parent, source.version,
                                     slot.filled).encode())
                size = recv_size(sock)
                if size is None or size == UNAVAILABLE:
                    raise _SourceFailed(f"does not hold version {source.version}")
                if size != nbytes:
                    raise ProtocolError(f"{self.spec.who()}: relay message of {size} bytes, "
                                        f"expected {nbytes}")
                while slot.filled < nbytes:
                    now = time.monotonic()
                    if now > deadline:
                        raise _SourceFailed(f"version {source.version} not complete within "
                                            f"the transfer timeout")
                    if patience is not None and waited > patience:
                        raise _SourceFailed(f"still sending after {hub.patience_s}s "
                                            f"({slot.filled} of {nbytes} bytes)")
                    start = slot.filled
                    n = sock.recv_into(slot.view[start:min(nbytes,
                                                           start + hub.chunk_bytes)])
                    waited += time.monotonic() - now
                    if n == 0:
                        raise _SourceFailed(f"closed after {start} of {nbytes} bytes")
                    out[start:start + n] = slot.view[start:start + n]
                    self._slots.advance(slot, n)
                    if self.spec.progress is not None:
                        self.spec.progress(source.version, slot.filled)
        except TimeoutError:
            raise _SourceFailed(f"sent nothing for {hub.stall_s}s "
                                f"({slot.filled} of {nbytes} bytes)") from None
        except OSError as exc:
            raise _SourceFailed(f"{exc} ({slot.filled} of {nbytes} bytes)") from None

    def close(self) -> None:
        if self._server is not None:
            with contextlib.suppress(OSError):
                self._server.close()
            self._server = None
