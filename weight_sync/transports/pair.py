"""The two-rank process group under one learner-collector link.

Each link gets its own group (rank 0 = learner, rank 1 = collector) built on a
``PrefixStore`` of the shared TCPStore, so a collector can fail, leave or come back
without touching the others, and no global world is ever initialised.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from weight_sync.errors import ClosedError, ConfigError, ProtocolError, WeightSyncTimeout
from weight_sync.layout import BufferLayout
from weight_sync.protocol import CLOSED, Keys

__all__ = ["LEARNER_RANK", "COLLECTOR_RANK", "PairLink", "address_towards", "process_alive"]

LEARNER_RANK = 0
COLLECTOR_RANK = 1


def address_towards(host: str, port: int) -> str | None:
    """This host's address on the route to ``host`` (loopback for a local learner).

    A collector binds its gloo socket there, so the link uses the interface the store
    connection uses, and a loopback run never listens on a public interface. ``None``
    if the route cannot be found (gloo then picks its default interface).
    """
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0][0]
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect((host, port))  # UDP: picks a route, sends nothing
            return str(probe.getsockname()[0])
    except OSError:
        return None


def process_alive(pid: int) -> bool:
    """False once process ``pid`` (on this host) is gone or a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a dead child its parent has not reaped yet still answers kill(pid, 0)
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def _gloo_options(timeout: float, bind_host: str | None) -> Any:
    opts = dist.ProcessGroupGloo._Options()  # type: ignore[attr-defined]
    opts._timeout = timedelta(seconds=timeout)
    iface = os.environ.get("GLOO_SOCKET_IFNAME")
    if iface:  # the user's choice wins, as in torch.distributed
        opts._devices = [dist.ProcessGroupGloo.create_device(interface=iface.split(",")[0])]
    elif bind_host:
        opts._devices = [dist.ProcessGroupGloo.create_device(hostname=bind_host)]
    else:
        opts._devices = [dist.ProcessGroupGloo.create_default_device()]
    return opts


class PairLink:
    """What both ends of a link share: the pair group, the stream's keys, close.

    Args:
        store: TCPStore client of the calling thread, for rendezvous and signals.
        keys: the stream's key names.
        collector_id: id of the collector at the other end (or this collector).
        incarnation: which connect of that collector id this link belongs to.
        layout: the message layout.
        backend: ``"gloo"`` or ``"nccl"``.
        timeout: bound on the rendezvous, each transfer and each store wait, seconds.
        bind_host: local address the gloo socket binds (``None``: gloo's default).
    """

    rank: int = -1

    def __init__(
        self, store: dist.Store, keys: Keys, collector_id: int, incarnation: int, *,
        layout: BufferLayout, backend: str = "gloo", timeout: float = 60.0,
        bind_host: str | None = None,
    ) -> None:
        if backend not in ("gloo", "nccl"):
            raise ConfigError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
        self.collector_id = collector_id
        self.incarnation = incarnation
        self.layout = layout
        self.backend = backend
        self.timeout = timeout
        self.bind_host = bind_host
        self._store = store
        self._signal_store = store  # the client close() writes with
        self._keys = keys
        self._group: Any = None  # ProcessGroupGloo or ProcessGroupNCCL
        self._seq = 0  # next message number on this link
        self._closed = False

    @property
    def device(self) -> torch.device:
        """Where message buffers must live for this backend."""
        if self.backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    @property
    def _peer(self) -> int:
        return COLLECTOR_RANK if self.rank == LEARNER_RANK else LEARNER_RANK

    def _who(self) -> str:
        return f"collector {self.collector_id} (incarnation {self.incarnation})"

    def connect(self, store: dist.Store | None = None, timeout: float | None = None) -> None:
        """Build the pair group; blocks until the peer does the same (bounded).

        Args:
            store: the client to rendezvous on when called from another thread than
                the link's own (a TCPStore client must not be shared between threads).
            timeout: bound on the rendezvous, seconds (default: the link's timeout;
                transfers are bounded by the link's timeout either way).
        """
        timeout = self.timeout if timeout is None else max(timeout, 0.001)
        if self._group is not None:
            return
        prefix = dist.PrefixStore(self._keys.pair_prefix(self.collector_id, self.incarnation),
                                  self._store if store is None else store)
        start = time.monotonic()
        try:
            if self.backend == "gloo":
                self._group = dist.ProcessGroupGloo(
                    prefix, self.rank, 2, _gloo_options(timeout, self.bind_host))
            else:
                opts = dist.ProcessGroupNCCL.Options()
                opts._timeout = timedelta(seconds=timeout)
                self._group = dist.ProcessGroupNCCL(prefix, self.rank, 2, opts)
        except (dist.DistError, RuntimeError) as exc:
            raise WeightSyncTimeout(
                f"link to {self._who()}: pair group rendezvous failed after "
                f"{time.monotonic() - start:.1f}s: {exc}") from exc
        if self._closed:  # closed from another thread meanwhile
            self._group = None

    def _require(self, what: str) -> Any:
        if self._closed:
            raise ClosedError(f"{what} on the closed link to {self._who()}")
        if self._group is None:
            raise ProtocolError(f"{what} before connect() on the link to {self._who()}")
        return self._group

    def close(self) -> None:
        """Release the link and wake whoever waits for its next message; idempotent."""
        if self._closed:
            return
        self._closed = True
        # On the learner side this tells the collector the stream ended; on the
        # collector side it wakes its own listener thread. If the store is gone
        # already, the peer learns it from its own wait.
        with contextlib.suppress(dist.DistError, RuntimeError):
            self._signal_store.set(
                self._keys.update(self.collector_id, self.incarnation, self._seq), str(CLOSED))
        self._release()
        self._group = None

    def _release(self) -> None:
        """Hook: drop what the subclass holds (buffers in flight)."""
