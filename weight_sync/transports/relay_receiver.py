"""A collector's end of ``transport="relay"``: :class:`RelayReceiver`.

It fetches each version from the parent the learner named in the update's note, into
a slot (a shared-memory segment) its own server streams on to its children at the same
time (pipelined), and copies each piece into the receiver's buffer as it lands. From a
parent on the same host it copies straight out of the parent's segment, told over a
socket only how many bytes have arrived (a parent whose segment it cannot open, e.g. in
another mount namespace under the same hostname, streams the bytes instead). A parent
that sends nothing for ``stall_s``, is still sending after ``patience_s``, closes, or does
not hold the version is left: the rest of the version (from the offset reached) comes
from the learner, which then marks that parent slow.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import socket
import time
from collections import Counter
from collections.abc import Callable, Mapping

import torch

from weight_sync.control.channel import LinkChannel
from weight_sync.errors import PeerGone, ProtocolError
from weight_sync.transports.base import LinkSpec
from weight_sync.transports.relay_plan import LEARNER
from weight_sync.transports.relay_sender import Assignment, HubInfo
from weight_sync.transports.relay_wire import (
    DONE,
    UNAVAILABLE,
    RelayServer,
    Request,
    Slot,
    Slots,
    recv_name,
    recv_size,
)
from weight_sync.wire.shm import SHM_DIR, sweep_dead_owners

__all__ = ["RelayReceiver", "probe_relay"]

log = logging.getLogger(__name__)

#: How long a joining collector tries to reach the learner's relay server.
PROBE_S = 2.0


def probe_relay(params: Mapping[str, str]) -> dict[str, str]:
    """Connect to the learner's relay server (at most :data:`PROBE_S`): ``{"reached":
    "<host>:<port>"}`` if this process reaches it, else nothing."""
    host, port = params.get("host", ""), params.get("port", "")
    try:
        with socket.create_connection((host, int(port)), timeout=PROBE_S):
            return {"reached": f"{host}:{port}"}
    except (OSError, ValueError) as exc:
        log.info("the learner's relay server at %s:%s is out of reach here: %s", host,
                 port, exc)
        return {}


class _SourceFailed(Exception):
    """The node being fetched from let this collector down (why, in the message)."""


class _NotShared(Exception):
    """The parent's segment is not in this collector's ``/dev/shm``."""


class _Mappings:
    """Read-only mappings of the same-host parents' segments, a few kept (a parent
    reuses a bounded set of segments)."""

    _KEEP = 8

    def __init__(self) -> None:
        self._maps: dict[str, tuple[mmap.mmap, memoryview]] = {}

    def view(self, name: str, nbytes: int) -> memoryview:
        entry = self._maps.pop(name, None)
        if entry is None:
            if not name or "/" in name:
                raise _NotShared(name)
            try:
                with open(os.path.join(SHM_DIR, name), "rb") as file:
                    mapping = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
            except (FileNotFoundError, ValueError):  # not ours, or empty
                raise _NotShared(name) from None
            if len(mapping) < nbytes:
                mapping.close()
                raise _NotShared(name)
            entry = (mapping, memoryview(mapping))
        self._maps[name] = entry  # newest last
        while len(self._maps) > self._KEEP:
            self._drop(next(iter(self._maps)))
        return entry[1]

    def _drop(self, name: str) -> None:
        mapping, view = self._maps.pop(name)
        view.release()
        mapping.close()

    def close(self) -> None:
        for name in list(self._maps):
            self._drop(name)


class RelayReceiver:
    """Receives versions from its assigned parent and serves them to its children.

    Attributes:
        fetched: versions received, by how the last part of each came: ``"shm"`` (out of
            a same-host parent's memory), ``"socket"`` (a parent's bytes) or
            ``"learner"`` (from the learner: as assigned, or after a parent failed).
    """

    def __init__(self, spec: LinkSpec) -> None:
        self.spec = spec
        self.fetched: Counter[str] = Counter()
        self._slots = Slots(spec.layout.nbytes, shared=True)
        self._maps = _Mappings()
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
                    how = "learner" if source.parent == LEARNER else "socket"
                    if source.local:
                        try:
                            self._fetch(source, told.parent, slot, buffer, deadline,
                                        local=True)
                            how = "shm"
                        except _NotShared:  # same name, other memory: take the bytes
                            log.info("%s: parent collector %d's memory is not shared here",
                                     self.spec.who(), source.parent)
                    if how != "shm":
                        self._fetch(source, told.parent, slot, buffer, deadline)
                    self.fetched[how] += 1
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
               buffer: torch.Tensor, deadline: float, *, local: bool = False) -> None:
        """Fill ``slot`` (and ``buffer``) from ``source``, from where it stands: its
        bytes over the socket, or (``local``) copied out of its segment as its counts
        of arrived bytes come in."""
        assert self._hub is not None
        hub, nbytes = self._hub, self._slots.nbytes
        try:
            remaining = deadline - time.monotonic()
            with socket.create_connection((source.host, source.port),
                                          timeout=min(hub.stall_s, max(remaining, 0.001))
                                          ) as sock:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.sendall(Request(self.spec.collector_id, told_parent, source.version,
                                     slot.filled, local).encode())
                size = recv_size(sock)
                if size is None or size == UNAVAILABLE:
                    raise _SourceFailed(f"does not hold version {source.version}")
                if size != nbytes:
                    raise ProtocolError(f"{self.spec.who()}: relay message of {size} bytes, "
                                        f"expected {nbytes}")
                if not local:
                    self._fill(source, slot, buffer, deadline, self._bytes_from(sock, slot))
                    return
                name = recv_name(sock)
                if name is None:
                    raise _SourceFailed("closed before naming its segment")
                parent = self._maps.view(name, nbytes)

                def land(start: int, end: int) -> None:
                    slot.view[start:end] = parent[start:end]

                self._fill(source, slot, buffer, deadline, self._counts_from(sock), land)
                sock.sendall(DONE)  # until now the parent kept its segment for us
        except TimeoutError:
            raise _SourceFailed(f"sent nothing for {hub.stall_s}s "
                                f"({slot.filled} of {nbytes} bytes)") from None
        except OSError as exc:
            raise _SourceFailed(f"{exc} ({slot.filled} of {nbytes} bytes)") from None

    def _bytes_from(self, sock: socket.socket, slot: Slot) -> Callable[[int], int]:
        """Receives the parent's next piece into ``slot``; returns where it ends."""
        assert self._hub is not None
        nbytes, chunk = self._slots.nbytes, self._hub.chunk_bytes

        def receive(start: int) -> int:
            n = sock.recv_into(slot.view[start:min(nbytes, start + chunk)])
            if n == 0:
                raise _SourceFailed(f"closed after {start} of {nbytes} bytes")
            return start + n
        return receive

    def _counts_from(self, sock: socket.socket) -> Callable[[int], int]:
        """Receives the parent's next count of arrived bytes."""
        nbytes = self._slots.nbytes

        def receive(start: int) -> int:
            filled = recv_size(sock)
            if filled is None:
                raise _SourceFailed(f"closed after {start} of {nbytes} bytes")
            if not start < filled <= nbytes:
                raise ProtocolError(f"{self.spec.who()}: relay count {filled} after {start}")
            return filled
        return receive

    def _fill(self, source: Assignment, slot: Slot, buffer: torch.Tensor, deadline: float,
              receive: Callable[[int], int],
              land: Callable[[int, int], None] | None = None) -> None:
        """Until ``slot`` is full: ``receive`` the next piece (waiting on the parent),
        ``land`` it in the slot if it is not there yet, copy it into ``buffer``."""
        assert self._hub is not None
        nbytes, out = self._slots.nbytes, buffer.numpy().data
        # Patience counts only the time spent waiting on the parent, not this
        # collector's own work (a slow child must not blame its parent).
        patience = None if source.parent == LEARNER else self._hub.patience_s
        waited = 0.0
        while slot.filled < nbytes:
            now = time.monotonic()
            if now > deadline:
                raise _SourceFailed(f"version {source.version} not complete within the "
                                    f"transfer timeout")
            if patience is not None and waited > patience:
                raise _SourceFailed(f"still sending after {patience}s "
                                    f"({slot.filled} of {nbytes} bytes)")
            start = slot.filled
            end = receive(start)
            waited += time.monotonic() - now
            if land is not None:
                land(start, end)
            out[start:end] = slot.view[start:end]
            self._slots.advance(slot, end - start)
            if self.spec.progress is not None:
                self.spec.progress(source.version, slot.filled)

    def close(self) -> None:
        if self._server is not None:
            with contextlib.suppress(OSError):
                self._server.close()
            self._server = None
        self._maps.close()
        self._slots.clear()
        # A neighbour killed with its process group left its slots behind: this host's
        # last relay end to close removes them (a relay end made later would too).
        sweep_dead_owners()
