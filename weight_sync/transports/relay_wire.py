"""The relay transport's wire: slots that fill while a message arrives, and the server
that streams them on to a node's children.

Every node of a relay (the learner, and each collector) keeps the messages it holds in
:class:`Slot` s: a flat ``uint8`` buffer and a count of the bytes of it that have
arrived. A child asks its parent's :class:`RelayServer` for one version from an offset
(:class:`Request`); the server streams that version's slot from there, following the
count as it grows, so each piece is forwarded as soon as it lands: the hops of a chain
overlap, and a chain of N hosts takes about one transfer plus N small delays.

One TCP connection per request: a child that re-attaches (to another parent, or to the
learner) asks again from the offset it reached, and nothing lingers between versions.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from weight_sync.errors import SharedMemoryFull
from weight_sync.wire.shm import create_segment

__all__ = ["Slot", "Slots", "Request", "RelayServer", "UNAVAILABLE", "DONE", "recv_exact",
           "send_size", "recv_size", "send_name", "recv_name"]

log = logging.getLogger(__name__)

#: The answer's size field when the server does not hold the version asked for.
UNAVAILABLE = -1
_MAGIC = 0x57535231  # "WSR1"
_SIZE = struct.Struct("!q")
_NAME = struct.Struct("!H")
#: What a local child sends once it copied the whole version out of the segment.
DONE = b"d"


@dataclass(frozen=True)
class Request:
    """What a child asks of a parent: ``version`` from byte ``offset``.

    ``told_parent`` is the parent the learner assigned to the child (``-1``: the
    learner): a request that reaches the learner from a child assigned another parent
    is a fallback, and tells the learner that parent let the child down. ``local``: the
    child shares the parent's ``/dev/shm`` (it thinks): send the slot's segment name and
    then only how many bytes have arrived, and the child copies them from the segment.
    """

    _WIRE = struct.Struct("!IiiqqB")

    collector_id: int
    told_parent: int
    version: int
    offset: int
    local: bool = False

    def encode(self) -> bytes:
        return self._WIRE.pack(_MAGIC, self.collector_id, self.told_parent, self.version,
                               self.offset, int(self.local))

    @classmethod
    def read(cls, sock: socket.socket) -> Request | None:
        """The request on ``sock``; ``None`` if it is not one (closed, or foreign)."""
        raw = recv_exact(sock, cls._WIRE.size)
        if raw is None:
            return None
        magic, cid, told, version, offset, local = cls._WIRE.unpack(raw)
        return (None if magic != _MAGIC or offset < 0
                else cls(cid, told, version, offset, bool(local)))


def recv_exact(sock: socket.socket, n: int) -> bytes | None:
    """``n`` bytes from ``sock``, or ``None`` if it closes first."""
    data = bytearray()
    while len(data) < n:
        piece = sock.recv(n - len(data))
        if not piece:
            return None
        data += piece
    return bytes(data)


def send_size(sock: socket.socket, size: int) -> None:
    sock.sendall(_SIZE.pack(size))


def recv_size(sock: socket.socket) -> int | None:
    raw = recv_exact(sock, _SIZE.size)
    return None if raw is None else int(_SIZE.unpack(raw)[0])


def send_name(sock: socket.socket, name: str) -> None:
    data = name.encode()
    sock.sendall(_NAME.pack(len(data)) + data)


def recv_name(sock: socket.socket) -> str | None:
    raw = recv_exact(sock, _NAME.size)
    if raw is None:
        return None
    data = recv_exact(sock, _NAME.unpack(raw)[0])
    return None if data is None else data.decode(errors="replace")


class Slot:
    """One message a node holds (or is receiving): ``filled`` bytes of ``buffer`` are
    valid. Changed only through :class:`Slots`, under its lock."""

    def __init__(self, buffer: torch.Tensor, segment: str | None = None) -> None:
        self.buffer = buffer
        self.segment = segment
        """The shared-memory segment holding ``buffer``, if any."""
        self.view = buffer.numpy().data
        self.version = -1
        self.filled = 0
        self.filling = False
        self.readers = 0  # server threads streaming it
        self.pins = 0  # learner: links whose message it is
        self.on_free: Callable[[], None] | None = None  # learner: give the snapshot back


class Slots:
    """A node's slots, and the condition its server threads wait on.

    A collector :meth:`claim` s a slot for each message it receives (reusing one nobody
    reads that is not among the ``keep`` newest); the learner :meth:`pin` s its
    snapshots. Either way a slot is never rewritten while a server thread streams it.
    ``shared``: a collector's slots live in shared-memory segments, so that its
    neighbours on the host copy from them instead of through a socket; where
    ``/dev/shm`` has no room for one more, the slot is made in private memory (its
    neighbours then take its bytes over the socket) and ``shared_failed`` is counted.
    A learner's hub makes its slots before it knows the message size: it sets
    ``nbytes`` with its first link.
    """

    def __init__(self, nbytes: int, keep: int = 2, shared: bool = False) -> None:
        self.nbytes = nbytes
        self._keep = keep
        self._shared = shared
        self._segments: list[Any] = []
        self._cond = threading.Condition()
        self._slots: list[Slot] = []
        self.shared_failed = 0

    @property
    def allocated(self) -> int:
        return len(self._slots)

    # -- a collector's own messages ------------------------------------------------------
    def claim(self, version: int) -> Slot:
        """A slot to receive ``version`` into (its server may stream it at once)."""
        with self._cond:
            done = sorted((s for s in self._slots if not s.filling and s.version >= 0),
                          key=lambda s: s.version)
            kept = {id(s) for s in done[-self._keep:]}
            free = [s for s in self._slots if s.readers == 0 and not s.filling
                    and id(s) not in kept]
            if free:
                slot = min(free, key=lambda s: s.version)
            else:
                slot = self._new_slot()
                self._slots.append(slot)
            slot.version, slot.filled, slot.filling = version, 0, True
            self._cond.notify_all()
            return slot

    def _new_slot(self) -> Slot:
        if self._shared:
            try:
                segment, buffer = create_segment(self.nbytes)
            except SharedMemoryFull as exc:
                self.shared_failed += 1
                log.warning("relay: %s; this slot is private (same-host children take "
                            "its bytes over the socket)", exc)
            else:
                self._segments.append(segment)
                return Slot(buffer, segment.name)
        return Slot(torch.empty(self.nbytes, dtype=torch.uint8))

    def advance(self, slot: Slot, n: int) -> None:
        """``n`` more bytes of ``slot`` arrived."""
        with self._cond:
            slot.filled += n
            self._cond.notify_all()

    def end(self, slot: Slot, ok: bool) -> None:
        """The receive into ``slot`` ended; a failed one is forgotten (its readers see
        the end and drop their children, who then fall back)."""
        with self._cond:
            slot.filling = False
            if not ok:
                slot.version = -1
            self._cond.notify_all()

    # -- the learner's snapshots ---------------------------------------------------------
    def pin(self, version: int, buffer: torch.Tensor, on_free: Callable[[], None]) -> bool:
        """Hold the complete message ``version`` (in ``buffer``) for a link; False if
        it was held already (``on_free`` is then not kept: call it yourself)."""
        with self._cond:
            for slot in self._slots:
                if slot.version == version:
                    slot.pins += 1
                    return False
            slot = Slot(buffer)
            slot.version, slot.filled, slot.pins, slot.on_free = (version, self.nbytes, 1,
                                                                  on_free)
            self._slots.append(slot)
            self._cond.notify_all()
            return True

    def unpin(self, version: int) -> None:
        """One link no longer needs ``version``; the last one frees it once no server
        thread streams it."""
        with self._cond:
            slot = next((s for s in self._slots if s.version == version), None)
            if slot is not None:
                slot.pins -= 1
                self._free_if_unused(slot)

    def _free_if_unused(self, slot: Slot) -> None:
        if slot.on_free is not None and slot.pins <= 0 and slot.readers == 0:
            self._slots.remove(slot)
            slot.version = -1
            slot.on_free()

    def clear(self) -> None:
        """Free every pinned slot and unlink the segments (the node is closing); the
        memory goes with the last mapping."""
        with self._cond:
            for slot in list(self._slots):
                if slot.on_free is not None:
                    self._slots.remove(slot)
                    slot.on_free()
            for segment in self._segments:
                with contextlib.suppress(FileNotFoundError):
                    segment.unlink()
            self._segments.clear()
            self._cond.notify_all()

    # -- the server's side ---------------------------------------------------------------
    def find(self, version: int, timeout: float) -> Slot | None:
        """The slot of ``version``, waiting up to ``timeout`` for it to appear (the
        node's own receive may start a moment after its child asks); counted as read
        until :meth:`done_reading`."""
        with self._cond:
            slot = self._wait(lambda: self._lookup(version), timeout)
            if slot is not None:
                slot.readers += 1
            return slot

    def _lookup(self, version: int) -> Slot | None:
        return next((s for s in self._slots if s.version == version), None)

    def _wait(self, found: Callable[[], Slot | None], timeout: float) -> Slot | None:
        slot = found()
        if slot is None and self._cond.wait_for(lambda: found() is not None, timeout):
            slot = found()
        return slot

    def follow(self, slot: Slot, have: int, version: int, timeout: float) -> int:
        """Bytes of ``slot`` valid now, once more than ``have`` are (or ``timeout``
        passed, or the slot stopped holding ``version``: then ``have`` or less)."""
        with self._cond:
            self._cond.wait_for(lambda: slot.version != version or slot.filled > have
                                or not slot.filling, timeout)
            return slot.filled if slot.version == version else -1

    def wait_unread(self, timeout: float) -> bool:
        """Wait up to ``timeout`` until no server thread streams a slot; False if one
        still does."""
        with self._cond:
            return self._cond.wait_for(
                lambda: all(s.readers == 0 for s in self._slots), timeout)

    def done_reading(self, slot: Slot) -> None:
        with self._cond:
            slot.readers -= 1
            self._free_if_unused(slot)
            self._cond.notify_all()


class RelayServer:
    """Streams a node's slots to the children that ask (one thread per request).

    Args:
        slots: what the node holds.
        host: address to listen on (port chosen by the system).
        stall_s: a child that takes nothing for this long, or a version that does not
            appear or grow for this long, ends that request (the child falls back).
        chunk_bytes: largest piece sent at once.
        on_request: called with each request before it is served (the learner uses it
            to notice fallbacks).

    A connection that closes before its request (a collector probing that it reaches
    the server) is dropped.
    """

    def __init__(self, slots: Slots, host: str, *, stall_s: float, chunk_bytes: int,
                 on_request: Callable[[Request], None] | None = None) -> None:
        self._slots = slots
        self._stall_s = stall_s
        self._chunk = chunk_bytes
        self._on_request = on_request
        self._listener = socket.create_server((host, 0), backlog=128)
        self.address: tuple[str, int] = self._listener.getsockname()[:2]
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True,
                         name=f"weight-sync-relay-{self.address[1]}").start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # closed
            with self._lock:
                if self._closed:
                    conn.close()
                    return
                self._conns.add(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True,
                             name="weight-sync-relay-serve").start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(self._stall_s)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            request = Request.read(conn)
            if request is None:
                return
            if self._on_request is not None:
                self._on_request(request)
            slot = self._slots.find(request.version, self._stall_s)
            if slot is None:
                send_size(conn, UNAVAILABLE)
                return
            try:
                if request.local and slot.segment is not None:
                    self._count(conn, slot, request, slot.segment)
                elif request.local:  # a slot in private memory: the child asks for bytes
                    send_size(conn, self._slots.nbytes)
                    send_name(conn, "")
                else:
                    self._stream(conn, slot, request)
            finally:
                self._slots.done_reading(slot)
        except OSError as exc:  # the child went away or stopped reading: it falls back
            log.debug("relay request ended: %s", exc)
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()

    def _stream(self, conn: socket.socket, slot: Slot, request: Request) -> None:
        send_size(conn, self._slots.nbytes)
        sent = request.offset
        while sent < self._slots.nbytes:
            filled = self._slots.follow(slot, sent, request.version, self._stall_s)
            if filled <= sent:
                log.info("relay: version %d stopped growing at byte %d; dropping collector "
                         "%d's request", request.version, sent, request.collector_id)
                return
            end = min(filled, sent + self._chunk)
            while sent < end:  # not sendall: its timeout bounds the whole piece
                sent += conn.send(slot.view[sent:end])

    def _count(self, conn: socket.socket, slot: Slot, request: Request, segment: str) -> None:
        """For a child on this host: the segment's name, then how many bytes of it are
        valid each time that grows; the slot stays ours until the child says it copied
        all of it."""
        send_size(conn, self._slots.nbytes)
        send_name(conn, segment)
        told = request.offset
        while told < self._slots.nbytes:
            filled = self._slots.follow(slot, told, request.version, self._stall_s)
            if filled <= told:
                return
            send_size(conn, filled)
            told = filled
        if recv_exact(conn, len(DONE)) != DONE:
            log.info("relay: collector %d left before copying version %d",
                     request.collector_id, request.version)

    def close(self) -> None:
        """Stop listening and end the requests in progress; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            conns, self._conns = list(self._conns), set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept
        self._listener.close()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
