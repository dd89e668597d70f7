"""torch.distributed point-to-point transport over a standalone pair group.

Each learner-collector link gets its own two-rank process group (rank 0 = learner,
rank 1 = collector) built on a ``PrefixStore`` of the shared TCPStore, so a collector
can fail, leave or come back without touching the others, and no global world is
ever initialised. One message (the whole packed snapshot) moves per update.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from weight_sync.errors import (
    ClosedError,
    CollectorFailed,
    ConfigError,
    PeerGone,
    ProtocolError,
    WeightSyncError,
    WeightSyncTimeout,
)
from weight_sync.layout import BufferLayout, named_leaves
from weight_sync.packing import copy_in, read_header
from weight_sync.protocol import CLOSED, Keys
from weight_sync.snapshots import Snapshot
from weight_sync.store import get_int, wait_keys

__all__ = ["DistributedTransport", "LEARNER_RANK", "COLLECTOR_RANK"]

log = logging.getLogger(__name__)

LEARNER_RANK = 0
COLLECTOR_RANK = 1


def _is_zombie(pid: int) -> bool:
    """A dead child not yet reaped by its parent still answers kill(pid, 0)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return False


class _InFlight:
    """A message sent to the collector and not yet acknowledged."""

    def __init__(self, seq: int, snapshot: Snapshot, work: Any) -> None:
        self.seq = seq
        self.version = snapshot.version
        self.snapshot: Snapshot | None = snapshot
        self.work = work
        self.started = time.perf_counter()


class DistributedTransport:
    """One link of weight-sync over gloo (CPU) or nccl (CUDA) send/recv.

    The learner builds one per collector with ``rank=LEARNER_RANK``; a collector
    builds one with ``rank=COLLECTOR_RANK``. ``store`` is the shared TCPStore client
    of the calling thread.

    Args:
        store: TCPStore used for the link's rendezvous and signals.
        keys: the stream's key names.
        collector_id: id of the collector at the other end (or this collector).
        incarnation: which connect of that collector id this link belongs to.
        rank: ``LEARNER_RANK`` or ``COLLECTOR_RANK``.
        layout: the message layout.
        backend: ``"gloo"`` or ``"nccl"``.
        timeout: bound on the rendezvous, each transfer and each store wait, seconds.
        ack_store: a second store client for acks written from another thread
            (a TCPStore client must not be shared between threads).
    """

    def __init__(
        self, store: dist.Store, keys: Keys, collector_id: int, incarnation: int, *,
        rank: int, layout: BufferLayout, backend: str = "gloo", timeout: float = 60.0,
        ack_store: dist.Store | None = None,
    ) -> None:
        if rank not in (LEARNER_RANK, COLLECTOR_RANK):
            raise ConfigError(f"rank must be {LEARNER_RANK} or {COLLECTOR_RANK}, got {rank!r}")
        self.collector_id = collector_id
        self.incarnation = incarnation
        self.rank = rank
        self.layout = layout
        self.backend = backend
        self.timeout = timeout
        self._store = store
        self._ack_store = ack_store if ack_store is not None else store
        self._keys = keys
        self._group: Any = None  # ProcessGroupGloo or ProcessGroupNCCL
        self._seq = 0
        self._closed = False
        # sender side
        self._in_flight: _InFlight | None = None
        self._pending: Snapshot | None = None
        self.acked_version = -1
        self.last_round_s = float("nan")
        self.failure: WeightSyncError | None = None
        self.peer_pid: int | None = None
        """The collector's pid when it runs on this host: checked for liveness."""

    # -- shared --------------------------------------------------------------------
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

    def connect(self) -> None:
        """Build the pair group; blocks until the peer does the same (bounded)."""
        if self._group is not None:
            return
        prefix = dist.PrefixStore(self._keys.pair_prefix(self.collector_id, self.incarnation),
                                  self._store)
        start = time.monotonic()
        try:
            if self.backend == "gloo":
                self._group = dist.ProcessGroupGloo(
                    prefix, self.rank, 2, timedelta(seconds=self.timeout))
            else:
                opts = dist.ProcessGroupNCCL.Options()
                opts._timeout = timedelta(seconds=self.timeout)
                self._group = dist.ProcessGroupNCCL(prefix, self.rank, 2, opts)
        except (dist.DistError, RuntimeError) as exc:
            raise WeightSyncTimeout(
                f"link to {self._who()}: pair group rendezvous failed after "
                f"{time.monotonic() - start:.1f}s: {exc}") from exc

    def _require(self, rank: int, what: str) -> Any:
        if self._closed:
            raise ClosedError(f"{what} on the closed link to {self._who()}")
        if self.rank != rank:
            side = "learner" if rank == LEARNER_RANK else "collector"
            raise ProtocolError(f"{what} is a {side}-side call; this link is the other side")
        if self._group is None:
            raise ProtocolError(f"{what} before connect() on the link to {self._who()}")
        return self._group

    def close(self) -> None:
        """Release the link; on the learner side, tell the collector we closed."""
        if self._closed:
            return
        self._closed = True
        # Wakes the peer's wait for the next message (its own or ours). If the store is
        # gone already, the peer learns it from its own wait.
        with contextlib.suppress(dist.DistError, RuntimeError):
            self._ack_store.set(
                self._keys.update(self.collector_id, self.incarnation, self._seq), str(CLOSED))
        for snap in self._drop_in_flight():
            snap.release()
        self._group = None

    # -- sender side ---------------------------------------------------------------
    def setup_connection_and_weights_on_sender(self, snapshot: Snapshot) -> None:
        self.connect()
        self.send_weights_async(snapshot)

    def send_initial_weights(self, snapshot: Snapshot) -> None:
        self.send_weights(snapshot)

    def send_weights(self, snapshot: Snapshot) -> None:
        self.send_weights_async(snapshot)
        self.wait_ack(self.timeout)

    def send_weights_async(self, snapshot: Snapshot) -> None:
        """Send ``snapshot`` now if the link is idle, else keep it as the newest pending.

        An older pending snapshot is dropped: a slow collector gets the newest version.
        """
        self._require(LEARNER_RANK, "send_weights_async")
        if self.failure is not None:
            raise self.failure
        if self._pending is not None:
            self._pending.release()
        self._pending = snapshot.retain()
        self.progress()

    @property
    def target_version(self) -> int:
        """The newest version handed to this link (sent or pending)."""
        if self._pending is not None:
            return self._pending.version
        if self._in_flight is not None:
            return self._in_flight.version
        return self.acked_version

    @property
    def waiting_key(self) -> str | None:
        """The ack key whose arrival would let this link make progress, if any."""
        if self._in_flight is None:
            return None
        return self._keys.ack(self.collector_id, self.incarnation, self._in_flight.version)

    def progress(self) -> None:
        """Non-blocking: finish completed sends, record acks, start the pending send."""
        group = self._require(LEARNER_RANK, "progress")
        if self.failure is not None:
            return
        try:
            flight = self._in_flight
            if flight is not None and not self.peer_alive():
                raise CollectorFailed(
                    f"{self._who()} (pid {self.peer_pid}) died before acking version "
                    f"{flight.version}", self.collector_id)
            if flight is not None and flight.work is not None and flight.work.is_completed():
                self._finish_work(flight)
            if flight is not None and self._store.check([self.waiting_key or ""]):
                self._finish_work(flight)  # acked means received: the work is done
                self.acked_version = flight.version
                self.last_round_s = time.perf_counter() - flight.started
                self._store.delete_key(self.waiting_key or "")
                self._in_flight = None
            if self._in_flight is None and self._pending is not None:
                self._start(group, self._pending)
                self._pending = None  # its reference moved to the in-flight record
        except WeightSyncError as exc:
            self._fail(exc)
        except (dist.DistError, RuntimeError) as exc:
            self._fail(CollectorFailed(f"link to {self._who()} failed: {exc}",
                                       self.collector_id))

    def peer_alive(self) -> bool:
        """False once a same-host collector's process is known dead."""
        if self.peer_pid is None:
            return True  # remote: failures surface as transfer errors or timeouts
        try:
            os.kill(self.peer_pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return not _is_zombie(self.peer_pid)

    def _start(self, group: Any, snapshot: Snapshot) -> None:
        key = self._keys.update(self.collector_id, self.incarnation, self._seq)
        self._store.set(key, str(snapshot.version))
        work = group.send([snapshot.buffer], self._peer, 0)
        self._in_flight = _InFlight(self._seq, snapshot, work)
        self._seq += 1

    def _finish_work(self, flight: _InFlight) -> None:
        if flight.work is None:
            return
        work, flight.work = flight.work, None
        try:
            work.wait(timedelta(seconds=self.timeout))
        finally:
            if flight.snapshot is not None:
                flight.snapshot.release()
                flight.snapshot = None

    def _fail(self, exc: WeightSyncError) -> None:
        log.warning("link to %s failed: %s", self._who(), exc)
        self.failure = exc
        for snap in self._drop_in_flight():
            snap.release()

    def _drop_in_flight(self) -> list[Snapshot]:
        snaps = []
        if self._in_flight is not None and self._in_flight.snapshot is not None:
            snaps.append(self._in_flight.snapshot)
        if self._pending is not None:
            snaps.append(self._pending)
        self._in_flight, self._pending = None, None
        return snaps

    def wait_ack(self, timeout: float) -> None:
        """Wait until the collector applied the newest version handed to this link.

        Raises:
            WeightSyncTimeout: naming the collector and version, after ``timeout`` s.
            CollectorFailed: the link broke.
        """
        deadline = time.monotonic() + timeout
        target = self.target_version
        while True:
            self.progress()
            if self.failure is not None:
                raise self.failure
            if self.acked_version >= target:
                return
            key = self.waiting_key
            remaining = deadline - time.monotonic()
            if key is None or remaining <= 0:
                raise WeightSyncTimeout(
                    f"{self._who()} did not ack version {target} within {timeout:.2f}s "
                    f"(last acked: {self.acked_version})")
            try:
                wait_keys(self._store, [key], remaining, f"{self._who()} to ack")
            except WeightSyncTimeout as exc:
                raise WeightSyncTimeout(
                    f"{self._who()} did not ack version {target} within {timeout:.2f}s "
                    f"(last acked: {self.acked_version})") from exc

    # -- receiver side -------------------------------------------------------------
    def setup_connection_and_weights_on_receiver(
        self, *, worker_idx: int, weights: Any = None, model: Any = None,
        strategy: Any = None,
    ) -> int:
        if worker_idx != self.collector_id:
            raise ConfigError(f"worker_idx {worker_idx!r} is not this link's collector id "
                              f"{self.collector_id}")
        self.connect()
        version = self.receive_weights(self.timeout, weights=weights, model=model,
                                       strategy=strategy)
        if version is None:  # receive_weights raises on timeout; kept for the type checker
            raise WeightSyncTimeout(f"{self._who()}: no initial weights")
        return version

    def receive_initial_weights(self, weights: torch.Tensor) -> int:
        version = self.receive_weights(self.timeout, weights=weights)
        assert version is not None
        return version

    def receive_weights(
        self, timeout: float | None = None, *, weights: Any = None, model: Any = None,
        strategy: Any = None,
    ) -> int | None:
        """Receive the next message into the flat ``uint8`` buffer ``weights``.

        Args:
            timeout: ``0`` polls (never blocks); ``> 0`` waits that long for the
                learner's next message and returns ``None`` if none came; ``None``
                waits up to the link's ``timeout`` and raises if none came.
            weights: the flat buffer (``layout.nbytes`` bytes) to receive into.
            model: if given, the received weights are also copied into it.
            strategy: not supported (must be ``None``); kept for torchrl's signature.

        Returns:
            The version received, or ``None`` if nothing arrived in time. The
            acknowledgement is separate (:meth:`ack`), sent once the weights are used.

        Raises:
            ClosedError: the learner closed the stream.
            PeerGone: the learner's process or store went away.
            ProtocolError: a message with the wrong header or version (torn).
        """
        group = self._require(COLLECTOR_RANK, "receive_weights")
        if strategy is not None:
            raise ConfigError(f"strategy={strategy!r} is not supported; use None")
        if not isinstance(weights, torch.Tensor):
            raise ConfigError("receive_weights needs weights=<flat uint8 buffer of the layout>")
        key = self._keys.update(self.collector_id, self.incarnation, self._seq)
        if timeout == 0:
            try:
                if not self._store.check([key]):
                    return None
            except (dist.DistError, RuntimeError) as exc:
                raise PeerGone(f"{self._who()}: store lost while polling: {exc}") from exc
        else:
            try:
                wait_keys(self._store, [key], self.timeout if timeout is None else timeout,
                          f"{self._who()}: message {self._seq} from the learner")
            except WeightSyncTimeout:
                if timeout is None:
                    raise
                return None
        version = get_int(self._store, key)
        if version == CLOSED:
            raise ClosedError(f"{self._who()}: the learner closed the weight stream")
        self._recv_into(group, weights, version)
        self._store.delete_key(key)
        self._seq += 1
        if model is not None:
            copy_in(list(named_leaves(model).values()), self.layout.views(weights))
        return version

    def _recv_into(self, group: Any, buffer: torch.Tensor, version: int) -> None:
        start = time.monotonic()
        try:
            group.recv([buffer], self._peer, 0).wait(timedelta(seconds=self.timeout))
        except (dist.DistError, RuntimeError) as exc:
            raise PeerGone(
                f"{self._who()}: transfer of version {version} failed after "
                f"{time.monotonic() - start:.2f}s (learner gone?): {exc}") from exc
        got = read_header(buffer, self.layout)
        if got != version:
            raise ProtocolError(f"{self._who()}: message announced as version {version} "
                                f"carries version {got}")

    def ack(self, version: int) -> None:
        """Tell the learner ``version`` is applied (uses the ack store client)."""
        try:
            self._ack_store.set(self._keys.ack(self.collector_id, self.incarnation, version), "1")
        except (dist.DistError, RuntimeError) as exc:
            raise PeerGone(f"{self._who()}: store lost while acking v{version}: {exc}") from exc
