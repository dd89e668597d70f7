"""torchrl's transport names on weight-sync's sender and receiver: the one place they
live (:class:`LearnerEnd` on the learner, :class:`WorkerEnd` on a torchrl worker)."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch

from weight_sync.collector.receiver import WeightReceiver
from weight_sync.config import ConnectionInfo
from weight_sync.errors import (
    CollectorFailed,
    WeightSyncError,
    WeightSyncTimeout,
)
from weight_sync.learner.sender import WeightSender
from weight_sync.metrics import AckResult
from weight_sync.wire.layout import BufferLayout, named_leaves
from weight_sync.wire.live import LiveLeaves

__all__ = ["LearnerEnd", "WorkerEnd"]

class LearnerEnd:
    """torchrl's sender-side transport: one :class:`WeightSender` serving ``workers``.

    Collector id *c* of the sender is torchrl worker ``workers[c]``; errors are
    re-raised naming the torchrl worker.
    """

    def __init__(self, sender: WeightSender, workers: Sequence[int]) -> None:
        self.sender = sender
        self.workers = tuple(workers)

    @property
    def connection_info(self) -> ConnectionInfo:
        return self.sender.connection_info

    @property
    def version(self) -> int:
        return self.sender.version

    def setup_connection_and_weights_on_sender(self, timeout: float = 120.0) -> None:
        """Rendezvous with every worker of this end, check layouts, initial sync."""
        try:
            self.sender.connect(timeout)
        except WeightSyncError as exc:
            raise self._renamed(exc) from exc

    def send_weights_async(self, weights: Any = None, *,
                           collectors: Sequence[int] | None = None) -> int:
        """Snapshot ``weights`` (``None``: the live policy) and start sending it to
        all workers, or to ``collectors`` (collector ids) only; the new version. Never
        blocks on a worker."""
        return self.sender.send_weights_async(weights, collectors=collectors)

    def wait_ack(self, timeout: float = 60.0) -> AckResult:
        """Until every live worker of this end applied the newest version.

        Raises:
            CollectorFailed: naming the torchrl worker (``collector_id`` is its index).
            WeightSyncTimeout: naming the lagging torchrl workers.
        """
        try:
            return self.sender.wait_ack(timeout)
        except WeightSyncError as exc:
            raise self._renamed(exc) from exc

    def send_weights(self, weights: Any = None, timeout: float = 60.0) -> AckResult:
        """:meth:`send_weights_async` then :meth:`wait_ack` (torchrl's blocking send)."""
        self.send_weights_async(weights)
        return self.wait_ack(timeout)

    def close(self) -> None:
        self.sender.close()

    def _renamed(self, exc: WeightSyncError) -> WeightSyncError:
        """The same error, naming torchrl workers instead of collector ids (only when
        they differ: one sender per worker)."""
        if self.workers == tuple(range(len(self.workers))):
            return exc
        names = ", ".join(f"collector {c} = torchrl worker {w}"
                          for c, w in enumerate(self.workers))
        message = f"torchrl worker(s) {list(self.workers)} ({names}): {exc}"
        if isinstance(exc, CollectorFailed):
            worker = self.workers[exc.collector_id]
            return CollectorFailed(message, worker, exc.result, {worker: exc.pid})
        if isinstance(exc, WeightSyncTimeout):
            return WeightSyncTimeout(message, exc.result)
        return exc


class WorkerEnd:
    """torchrl's receiver-side transport: one :class:`WeightReceiver` on a worker.

    The receiver applies by pointing the tensors of the policy it was built on at the
    received buffer (no copy); :meth:`receive_weights` then makes a policy torchrl
    re-pointed to (``scheme.model`` after a device cast) follow: its tensors are pointed
    at the same storage, or copied into when they live on another device.
    """

    def __init__(self, receiver: WeightReceiver, model: Any, worker: int) -> None:
        self.receiver = receiver
        self.worker = worker
        self._model_ref = _ref(model)
        self._leaves = LiveLeaves(model, receiver.layout, f"torchrl worker {worker}")
        self._followers: dict[int, tuple[Any, list[torch.Tensor]]] = {}

    @property
    def version(self) -> int:
        return self.receiver.version

    def setup_connection_and_weights_on_receiver(
        self, *, worker_idx: int | None = None, weights: Any = None, model: Any = None,
        strategy: Any = None, timeout: float = 120.0,
    ) -> int:
        """Join the learner; returns once the policy holds its weights (the version)."""
        version = self.receiver.connect(timeout)
        if model is not None:
            self.follow(model)
        return version

    def receive_weights(self, timeout: float | None = None, *, weights: Any = None,
                        model: Any = None, strategy: Any = None) -> int | None:
        """Apply the newest received version, if one arrives within ``timeout`` (``0``
        polls; ``None`` waits up to the receiver's timeout and raises), and make
        ``model`` (if given) hold it too. Returns the version applied, or ``None``.

        Call it from one thread only (the scheme's background thread does).
        """
        version = self.receiver.receive_weights(timeout)
        if version is not None and model is not None:
            self.follow(model)
        return version

    def send_ack(self, message: str = "updated") -> None:
        """Nothing to do: :meth:`receive_weights` acks each version as it applies it."""

    def follow(self, model: Any) -> None:
        """Make ``model`` (a policy with the same layout) hold the applied weights."""
        if model is self._model_ref():
            return
        key = id(model)
        entry = self._followers.get(key)
        if entry is None or entry[0]() is not model:
            leaves = named_leaves(model)
            BufferLayout.from_tensors(leaves).check_compatible(
                self.receiver.layout.to_json(),
                who=f"torchrl worker {self.worker}: the re-pointed model", mine="model")
            self._followers = {key: (_ref(model), list(leaves.values()))}
            entry = self._followers[key]
        with torch.no_grad():
            for dst, src in zip(entry[1], self._leaves.current(), strict=True):
                if dst.device == src.device:
                    dst.data = src.data  # same storage: no copy
                else:
                    dst.copy_(src)

    def close(self) -> None:
        self.receiver.close()


def _ref(obj: Any) -> Callable[[], Any]:
    try:
        return weakref.ref(obj)
    except TypeError:  # a plain dict (state_dict) cannot be weakly referenced
        return lambda: obj

