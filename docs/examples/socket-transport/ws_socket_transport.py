"""A transport package, written the way a user would write one: a plain TCP socket per
link.

Installed with pip (``pip install docs/examples/socket-transport``), it provides the
transport ``"socket"`` through its entry point (``pyproject.toml``)::

    [project.entry-points."weight_sync.transports"]
    socket = "ws_socket_transport:SPEC"

so every process of the environment finds it by name, a freshly spawned collector
included, without importing this module. It uses only :mod:`weight_sync.transports`
and :mod:`weight_sync.errors`, and passes the same contract suite as the built-ins
(``tests/test_transport_contract.py``).
"""

from __future__ import annotations

import socket
import threading

import torch

from weight_sync.errors import CollectorFailed, PeerGone, WeightSyncTimeout
from weight_sync.transports import LinkChannel, LinkSpec, Snapshot, TransportSpec

__all__ = ["SPEC", "SocketReceiver", "SocketSender"]

NAME = "socket"


class _Send:
    """``sendall`` in a thread of its own, so ``send`` returns at once."""

    note = ""

    def __init__(self, spec: LinkSpec, sock: socket.socket, buffer: torch.Tensor) -> None:
        self._spec = spec
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(sock, buffer), daemon=True)
        self._thread.start()

    def _run(self, sock: socket.socket, buffer: torch.Tensor) -> None:
        try:
            sock.sendall(memoryview(buffer.numpy()))
        except OSError as exc:
            self._error = exc

    def done(self) -> bool:
        if self._thread.is_alive():
            return False
        if self._error is not None:
            raise CollectorFailed(f"socket send to {self._spec.who()} failed: {self._error}",
                                  self._spec.collector_id)
        return True

    def finish(self, timeout: float) -> None:
        self._thread.join(timeout)
        if not self.done():
            raise CollectorFailed(f"socket send to {self._spec.who()} still running after "
                                  f"{timeout:.1f}s", self._spec.collector_id)


class SocketSender:
    """Listens on the bind address, publishes it, accepts the collector's connection."""

    def __init__(self, spec: LinkSpec) -> None:
        self.spec = spec
        self._sock: socket.socket | None = None

    def connect(self, channel: LinkChannel, timeout: float) -> None:
        with socket.create_server((self.spec.bind_host or "127.0.0.1", 0)) as server:
            server.settimeout(timeout)
            host, port = server.getsockname()[:2]
            channel.publish("addr", f"{host} {port}")
            try:
                self._sock, _ = server.accept()
            except OSError as exc:
                raise WeightSyncTimeout(f"{self.spec.who()} did not connect its socket "
                                        f"within {timeout:.1f}s") from exc

    def send(self, snapshot: Snapshot) -> _Send:
        assert self._sock is not None, "send before connect"
        return _Send(self.spec, self._sock, snapshot.buffer)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class SocketReceiver:
    """Connects to the address the learner's end published; reads whole messages."""

    def __init__(self, spec: LinkSpec) -> None:
        self.spec = spec
        self._sock: socket.socket | None = None

    def connect(self, channel: LinkChannel, timeout: float) -> None:
        host, port = channel.read("addr", timeout).split()
        self._sock = socket.create_connection((host, int(port)), timeout=timeout)

    def receive(self, note: str, buffer: torch.Tensor | None,
                timeout: float) -> torch.Tensor:
        assert self._sock is not None and buffer is not None, "receive before connect"
        view, got = memoryview(buffer.numpy()), 0
        self._sock.settimeout(timeout)
        try:
            while got < len(view):
                n = self._sock.recv_into(view[got:])
                if n == 0:
                    raise PeerGone(f"{self.spec.who()}: the learner closed the socket after "
                                   f"{got} of {len(view)} bytes")
                got += n
        except OSError as exc:
            raise PeerGone(f"{self.spec.who()}: socket receive failed: {exc}") from exc
        return buffer

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


SPEC = TransportSpec(NAME, sender=SocketSender, receiver=SocketReceiver, backends=("gloo",))
"""What the entry point gives: the transport's ends and what it can do."""
