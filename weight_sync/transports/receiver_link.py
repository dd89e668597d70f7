"""The collector's end of one link: :class:`ReceiverLink`."""

from __future__ import annotations

import contextlib
import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from weight_sync.errors import (
    ClosedError,
    ConfigError,
    PeerGone,
    ProtocolError,
    WeightSyncTimeout,
)
from weight_sync.layout import named_leaves
from weight_sync.packing import copy_in, read_header
from weight_sync.protocol import CLOSED
from weight_sync.shm import SegmentReader
from weight_sync.store import wait_get
from weight_sync.transports.pair import COLLECTOR_RANK, PairLink

__all__ = ["ReceiverLink"]

# The "group" of a shared-memory link, which has none.
_NO_GROUP = object()


class ReceiverLink(PairLink):
    """Receives the learner's messages into a flat buffer (collector side).

    Built by :class:`~weight_sync.WeightReceiver`. Arguments as
    :class:`~weight_sync.transports.pair.PairLink`, plus:

    Args:
        ack_store: a second store client for acks written from another thread than
            the one receiving (a TCPStore client must not be shared between threads).
        shared_memory: read each message from the learner's shared-memory segment
            named in its signal (same host; the learner decides at admission).
    """

    rank = COLLECTOR_RANK

    def __init__(self, *args: Any, ack_store: dist.Store | None = None,
                 shared_memory: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if ack_store is not None:
            self._signal_store = ack_store
        self.shared_memory = shared_memory
        self._segments = SegmentReader(self.layout.nbytes) if shared_memory else None
        self._garbage: list[str] = []  # spent keys, deleted by collect_garbage()
        self._last_version: int | None = None  # version of the last message received

    # -- torchrl's names -------------------------------------------------------------
    def setup_connection_and_weights_on_receiver(
        self, *, worker_idx: int, weights: Any = None, model: Any = None,
        strategy: Any = None,
    ) -> int:
        """Rendezvous with the learner and receive the initial weights into ``weights``."""
        if worker_idx != self.collector_id:
            raise ConfigError(f"worker_idx {worker_idx!r} is not this link's collector id "
                              f"{self.collector_id}")
        self.connect()
        version = self.receive_weights(None, weights=weights, model=model, strategy=strategy)
        if version is None:  # receive_weights(None) raises instead; for the type checker
            raise WeightSyncTimeout(f"{self._who()}: no initial weights")
        return version

    def receive_initial_weights(self, weights: torch.Tensor) -> int:
        """Receive the first message into the flat buffer ``weights``; its version."""
        version = self.receive_weights(None, weights=weights)
        if version is None:
            raise WeightSyncTimeout(f"{self._who()}: no initial weights")
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
            PeerGone: the learner's process or store went away, or a transfer was cut
                short (``weights`` then holds garbage: do not apply it).
            ProtocolError: a message with the wrong header or version (torn).
        """
        group = self._require("receive_weights")
        if strategy is not None:
            raise ConfigError(f"strategy={strategy!r} is not supported; use None")
        if not isinstance(weights, torch.Tensor):
            raise ConfigError("receive_weights needs weights=<flat uint8 buffer of the layout>")
        self.collect_garbage()
        key = self._keys.update(self.collector_id, self.incarnation, self._seq)
        what = f"{self._who()}: message {self._seq} from the learner"
        if timeout == 0:
            try:
                if not self._store.check([key]):
                    return None
            except (dist.DistError, RuntimeError) as exc:
                raise PeerGone(f"{self._who()}: store lost while polling: {exc}") from exc
            value = self._store.get(key)
        else:
            try:
                value = wait_get(self._store, key,
                                 self.timeout if timeout is None else timeout, what)
            except WeightSyncTimeout:
                if timeout is None:
                    raise
                return None
        version, _, segment = value.decode().partition(" ")
        if int(version) == CLOSED:
            # Tell the learner we read it: it keeps its store up until we did.
            with contextlib.suppress(dist.DistError, RuntimeError):
                self._store.set(self._keys.bye(self.collector_id, self.incarnation), "1")
            raise ClosedError(f"{self._who()}: the learner closed the weight stream")
        if segment:
            self._copy_from(segment, weights, int(version))
        else:
            self._recv_into(group, weights, int(version))
        # The learner sent this message after reading the previous one's ack: both
        # keys are spent. Deleted by collect_garbage(), off the latency path.
        self._garbage.append(key)
        if self._last_version is not None:
            self._garbage.append(
                self._keys.ack(self.collector_id, self.incarnation, self._last_version))
        self._last_version = int(version)
        self._seq += 1
        if model is not None:
            copy_in(list(named_leaves(model).values()), self.layout.views(weights))
        return int(version)

    def collect_garbage(self) -> None:
        """Delete the store keys of messages already received and acked (best effort:
        a lost store shows up in the next wait)."""
        while self._garbage:
            key = self._garbage.pop()
            with contextlib.suppress(dist.DistError, RuntimeError):
                self._store.delete_key(key)

    def ack(self, version: int) -> None:
        """Tell the learner ``version`` is applied (uses the ack store client)."""
        try:
            self._signal_store.set(
                self._keys.ack(self.collector_id, self.incarnation, version), "1")
        except (dist.DistError, RuntimeError) as exc:
            raise PeerGone(f"{self._who()}: store lost while acking v{version}: {exc}") from exc

    def connect(self, store: Any = None, timeout: float | None = None) -> None:
        if self.shared_memory:
            self._group = _NO_GROUP  # nothing to build: the store and the segment suffice
            return
        super().connect(store, timeout)

    def close(self) -> None:
        super().close()
        if self._segments is not None:
            self._segments.close()

    def _copy_from(self, segment: str, buffer: torch.Tensor, version: int) -> None:
        if self._segments is None:
            raise ProtocolError(f"{self._who()}: message {self._seq} is in shared memory, "
                                f"but this link was not admitted for shared memory")
        try:
            self._segments.copy_into(segment, buffer)
        except FileNotFoundError as exc:
            raise PeerGone(f"{self._who()}: version {version}'s segment {segment!r} is "
                           f"gone (learner gone?)") from exc
        self._check_header(buffer, version)

    def _recv_into(self, group: Any, buffer: torch.Tensor, version: int) -> None:
        start = time.monotonic()
        try:
            group.recv([buffer], self._peer, 0).wait(timedelta(seconds=self.timeout))
        except (dist.DistError, RuntimeError) as exc:
            raise PeerGone(
                f"{self._who()}: transfer of version {version} failed after "
                f"{time.monotonic() - start:.2f}s (learner gone?): {exc}") from exc
        self._check_header(buffer, version)

    def _check_header(self, buffer: torch.Tensor, version: int) -> None:
        """Refuse a message whose header is not ours or names another version (torn)."""
        got = read_header(buffer, self.layout)
        if got != version:
            raise ProtocolError(f"{self._who()}: message announced as version {version} "
                                f"carries version {got}")
