"""What both ends of a remote collector's connection share: the environment variables,
the framing of the connection, the shared key, the control bytes."""

from __future__ import annotations

import os
import socket
import struct
from multiprocessing.connection import Connection

__all__ = ["ADDRESS_ENV", "CREDIT", "KEY_ENV", "STOP", "framed", "shared_key", "unbounded"]

#: The shared key a remote collector proves (default: a fixed, public one; set it).
KEY_ENV = "WEIGHT_SYNC_COLLECTOR_KEY"
#: ``host:port`` of the learner's :class:`~weight_sync.collectors.remote.NetworkLauncher`, for the
#: collector's entry point.
ADDRESS_ENV = "WEIGHT_SYNC_COLLECTORS"
_DEFAULT_KEY = b"weight-sync-collectors"
CREDIT, STOP = b"c", b"s"
"""What the learner sends a collector: one credit (a batch may be sent), stop."""


def framed(sock: socket.socket, timeout: float) -> Connection:
    """A framed ``Connection`` over ``sock`` whose reads fail after ``timeout`` s without
    data (an OS-level receive timeout: ``Connection`` needs a blocking socket) until
    :func:`unbounded` lifts it."""
    sock.setblocking(True)
    # Connection writes a large message's length and body in two sends: with Nagle the
    # body waits for the peer's delayed ACK of the length (p50 11 ms per 22 KB batch
    # over loopback, measured; 1.2 ms without Nagle).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sec = max(int(timeout), 0)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                    struct.pack("ll", sec, int((timeout - sec) * 1e6)))
    return Connection(sock.detach())


def unbounded(conn: Connection) -> None:
    with socket.socket(fileno=os.dup(conn.fileno())) as view:
        view.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 0, 0))


def shared_key(authkey: bytes | None) -> bytes:
    if authkey is not None:
        return authkey
    env = os.environ.get(KEY_ENV)
    return env.encode() if env else _DEFAULT_KEY
