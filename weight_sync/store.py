"""Creating and using the TCPStore, with errors turned into weight-sync's own.

torch's store raises ``DistStoreError`` for a timed-out wait and ``DistNetworkError``
when the peer is unreachable; callers here get :class:`WeightSyncTimeout` and
:class:`ConnectionFailed` naming the key and the time waited instead.
"""

from __future__ import annotations

import socket
import time
from datetime import timedelta

import torch.distributed as dist

from weight_sync.errors import ConnectionFailed, PeerGone, WeightSyncTimeout

__all__ = ["create_server", "connect_client", "wait_keys", "wait_get", "get_int", "WILDCARDS"]

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


def create_server(host: str, port: int, timeout: float) -> dist.TCPStore:
    """Start the store server on ``host:port`` (port 0 = any free port; read ``.port``).

    The server listens on ``host`` only: TCPStore on its own binds every interface
    whatever host it is given, so the socket is bound here and handed over.

    Raises:
        ConnectionFailed: the address cannot be bound (e.g. the port is in use).
    """
    try:
        fd = _listen(host, port)
    except OSError as exc:
        raise ConnectionFailed(f"cannot start the store on {host}:{port}: {exc}") from exc
    port = _bound_port(fd)
    try:
        # The store owns the descriptor from here on and closes it when it stops (also
        # when it fails to start). Its own client must reach the server: a wildcard
        # address is reached through loopback.
        return dist.TCPStore(
            WILDCARDS.get(host, host), port, is_master=True, wait_for_workers=False,
            timeout=timedelta(seconds=timeout), master_listen_fd=fd,
        )
    except (dist.DistError, RuntimeError) as exc:
        raise ConnectionFailed(f"cannot start the store on {host}:{port}: {exc}") from exc


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


def _is_timeout(exc: BaseException) -> bool:
    return isinstance(exc, dist.DistStoreError) and "timeout" in str(exc).lower()


def wait_keys(store: dist.Store, keys: list[str], timeout: float, what: str) -> None:
    """Block until every key exists, at most ``timeout`` seconds.

    Raises:
        WeightSyncTimeout: naming ``what`` and the keys still missing.
        PeerGone: the store server went away (the learner's process died).
    """
    start = time.monotonic()
    try:
        store.wait(keys, timedelta(seconds=max(timeout, 0.001)))
    except (dist.DistError, RuntimeError) as exc:
        waited = time.monotonic() - start
        if _is_timeout(exc):
            missing = [k for k in keys if not _check(store, k)]
            raise WeightSyncTimeout(
                f"timed out after {waited:.2f}s waiting for {what} (missing keys: {missing})"
            ) from exc
        raise PeerGone(f"store connection lost while waiting for {what}: {exc}") from exc


def wait_get(store: dist.Store, key: str, timeout: float, what: str) -> bytes:
    """The value of ``key`` once it exists, at most ``timeout`` seconds: one round trip
    where ``wait`` then ``get`` takes two. Sets the client's timeout, so give it a
    client of its own.

    Raises:
        WeightSyncTimeout: naming ``what`` and the key.
        PeerGone: the store server went away (the learner's process died).
    """
    start = time.monotonic()
    store.set_timeout(timedelta(seconds=max(timeout, 0.001)))
    try:
        return bytes(store.get(key))
    except (dist.DistError, RuntimeError) as exc:
        waited = time.monotonic() - start
        if _is_timeout(exc):
            raise WeightSyncTimeout(
                f"timed out after {waited:.2f}s waiting for {what} (key {key!r})") from exc
        raise PeerGone(f"store connection lost while waiting for {what}: {exc}") from exc


def _check(store: dist.Store, key: str) -> bool:
    try:
        return bool(store.check([key]))
    except (dist.DistError, RuntimeError):
        return False


def get_int(store: dist.Store, key: str) -> int:
    """Read an integer key that is known to exist."""
    try:
        return int(store.get(key))
    except (dist.DistError, RuntimeError) as exc:
        raise PeerGone(f"store connection lost while reading {key!r}: {exc}") from exc
