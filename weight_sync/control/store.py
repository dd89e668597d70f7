"""Starting the TCPStore server and connecting clients to it.

Reads and writes go through :mod:`weight_sync.control.channel`; this module only makes the
server (bound to exactly the address asked for) and the clients.
"""

from __future__ import annotations

import socket
import time
from datetime import timedelta

import torch.distributed as dist

from weight_sync.errors import ConnectionFailed

__all__ = ["StoreServer", "connect_client", "WILDCARDS"]

#: Addresses that bind every interface, and the loopback address that reaches them.
WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1"}


def _listen(host: str, port: int) -> int:
    """A listening socket bound to exactly ``host:port``; returns its descriptor."""
    family, kind, proto, _, addr = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(socket.SOMAXCONN)
    except OSError:
        sock.close()
        raise
    return sock.detach()


class StoreServer:
    """The learner's store server on ``host:port`` (port 0 = any free port).

    The server listens on ``host`` only: TCPStore on its own binds every interface
    whatever host it is given, so the socket is bound here and handed over. It runs
    until :meth:`stop`; the learner talks to it through clients like everyone else.

    Raises:
        ConnectionFailed: the address cannot be bound (e.g. the port is in use).
    """

    def __init__(self, host: str, port: int, timeout: float) -> None:
        try:
            fd = _listen(host, port)
        except OSError as exc:
            raise ConnectionFailed(f"cannot start the store on {host}:{port}: {exc}") from exc
        self.host = host
        self.port = _bound_port(fd)
        #: The address a client on this host dials (a wildcard is reached via loopback).
        self.local_host = WILDCARDS.get(host, host)
        try:
            # The store owns the descriptor from here on and closes it when it stops
            # (also when it fails to start).
            self._server: dist.TCPStore | None = dist.TCPStore(
                self.local_host, self.port, is_master=True, wait_for_workers=False,
                timeout=timedelta(seconds=timeout), master_listen_fd=fd,
            )
        except (dist.DistError, RuntimeError) as exc:
            raise ConnectionFailed(f"cannot start the store on {host}:{port}: {exc}") from exc

    def stop(self) -> None:
        """Stop serving; idempotent. Clients see the connection drop (``PeerGone``)."""
        # torch stops the server when the master object is destroyed, and this is the
        # only reference to it (clients hold their own objects).
        self._server = None


def _bound_port(fd: int) -> int:
    sock = socket.socket(fileno=fd)
    try:
        return int(sock.getsockname()[1])
    finally:
        sock.detach()


def connect_client(host: str, port: int, timeout: float) -> dist.TCPStore:
    """Connect to a running store, retrying until ``timeout`` seconds.

    Raises:
        ConnectionFailed: no store answered at ``host:port`` within ``timeout``.
    """
    start = time.monotonic()
    try:
        return dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=timeout))
    except (dist.DistError, RuntimeError) as exc:
        raise ConnectionFailed(
            f"no weight-sync store reachable at {host}:{port} after "
            f"{time.monotonic() - start:.1f}s: {exc}"
        ) from exc
