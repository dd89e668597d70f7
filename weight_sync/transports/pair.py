"""The two-rank process group under one ``"distributed"`` link.

Each link gets its own group (rank 0 = learner, rank 1 = collector) built on the link's
``PrefixStore``, so a collector can fail, leave or come back without touching the
others, and no global world is ever initialised.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from weight_sync.control.channel import LinkChannel
from weight_sync.control.store import IN_FLIGHT
from weight_sync.errors import ConfigError, WeightSyncTimeout
from weight_sync.transports.base import LinkSpec

__all__ = ["LEARNER_RANK", "COLLECTOR_RANK", "PairGroup"]

log = logging.getLogger(__name__)

LEARNER_RANK = 0
COLLECTOR_RANK = 1


class _Graveyard:
    """Closed groups, freed only where it is safe.

    A group's destructor gives up the GIL while it tears gloo down. If the last
    reference goes on a daemon thread (the frame of a receive that ended, a traceback),
    and the interpreter finalizes meanwhile, that thread is ended from inside torch's GIL
    guard and the process aborts (SIGABRT, seen on the test bed after a link cut). So a
    closed group is kept here and freed on the thread that closes or makes a group once
    nothing else holds it, and at exit on the exiting thread.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._groups: list[Any] = []

    def bury(self, group: Any) -> None:
        with self._lock:
            self._groups.append(group)
        self.reap()

    def reap(self, *, all_of_them: bool = False) -> None:
        """Free the groups no one else holds (every one with ``all_of_them``)."""
        with self._lock:
            # 3: the list's reference, the loop's, getrefcount's argument
            free = [g for g in self._groups if all_of_them or sys.getrefcount(g) <= 3]
            self._groups = [g for g in self._groups if not any(g is f for f in free)]
        del free  # the destructors run here, on this thread


_GRAVEYARD = _Graveyard()
IN_FLIGHT.after_drain(lambda: _GRAVEYARD.reap(all_of_them=True))


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


class PairGroup:
    """A standalone gloo or nccl group of two: this end (``rank``) and its peer.

    Args:
        spec: the link.
        rank: :data:`LEARNER_RANK` or :data:`COLLECTOR_RANK`.
    """

    def __init__(self, spec: LinkSpec, rank: int) -> None:
        if spec.backend not in ("gloo", "nccl"):
            raise ConfigError(f"backend must be 'gloo' or 'nccl', got {spec.backend!r}")
        self.spec = spec
        self.rank = rank
        self.peer = COLLECTOR_RANK if rank == LEARNER_RANK else LEARNER_RANK
        self.group: Any = None
        self._closed = False

    def connect(self, channel: LinkChannel, timeout: float) -> None:
        """Build the group; blocks until the peer does the same (bounded).

        Raises:
            WeightSyncTimeout: the peer did not build its end within ``timeout``.
        """
        if self.group is not None:
            return
        spec, timeout = self.spec, max(timeout, 0.001)
        store = channel.prefix_store()
        start = time.monotonic()
        group: Any
        try:
            if spec.backend == "gloo":
                group = dist.ProcessGroupGloo(store, self.rank, 2,
                                              _gloo_options(timeout, spec.bind_host))
            else:
                opts = dist.ProcessGroupNCCL.Options()
                opts._timeout = timedelta(seconds=timeout)
                group = dist.ProcessGroupNCCL(store, self.rank, 2, opts)
        except (dist.DistError, RuntimeError) as exc:
            raise WeightSyncTimeout(
                f"link to {spec.who()}: pair group rendezvous failed after "
                f"{time.monotonic() - start:.1f}s: {exc}") from exc
        # Transfers are bounded by the link's timeout, not the rendezvous deadline.
        group._set_default_timeout(timedelta(seconds=spec.timeout))
        self.group = group
        if self._closed:  # closed from another thread meanwhile
            self.close()

    def close(self) -> None:
        """Shut the group down (its sockets and threads); idempotent."""
        self._closed = True
        group, self.group = self.group, None
        if group is None:
            return
        try:
            group.shutdown()
        except (dist.DistError, RuntimeError) as exc:  # a peer already gone: nothing to do
            log.debug("pair group of %s: shutdown: %s", self.spec.who(), exc)
        _GRAVEYARD.bury(group)
