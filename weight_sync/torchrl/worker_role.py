"""A worker's half of :class:`~weight_sync.torchrl.WeightSyncTorchRLScheme`: its
receiver, and the background thread that applies each version between two policy calls
and then does torchrl's bookkeeping."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from typing import Any

import torch
from tensordict import TensorDict, TensorDictBase
from torch import nn

from weight_sync.collector.hooks import ReceiverHooks
from weight_sync.collector.receiver import WeightReceiver
from weight_sync.config import ConnectionInfo
from weight_sync.errors import ClosedError, WeightSyncError
from weight_sync.torchrl.ends import WorkerEnd
from weight_sync.torchrl.gate import PolicyGate
from weight_sync.wire.layout import named_leaves

__all__ = ["SchemeWorker"]

log = logging.getLogger(__name__)

# The background thread waits for the next version in slices this long, so close()
# stops it within one slice.
_POLL_S = 0.1
# Once a version has arrived, it is in the receiver's hand-off queue within this long.
_ARRIVAL_S = 0.5


class SchemeWorker:
    """One worker's receiver and its apply thread.

    Args:
        model: the worker's policy (meta tensors get real storage before the initial
            sync fills them).
        info: the learner's connection info; ``collector_id``: this worker's id there.
        worker: the worker's index among the scheme's workers.
        context: the worker's torchrl collector now (its ``update_policy_weights_`` /
            ``increment_version`` move ``policy_version``), or ``None``; read at each
            apply, since torchrl may register the collector after the connect.
        model_id: torchrl's name of the model.
        current_model: the model torchrl holds now (it re-points it after a device cast).
        on_applied: called with each version once torchrl counted it.
        timeout, secret: the receiver's store/transfer bound and shared secret.
    """

    def __init__(self, model: Any, info: ConnectionInfo, collector_id: int, worker: int, *,
                 context: Callable[[], Any], model_id: str, current_model: Callable[[], Any],
                 on_applied: Callable[[int], None], timeout: float,
                 secret: str | bytes) -> None:
        self.worker = worker
        self.error: WeightSyncError | None = None
        """What ended the background stream (``None`` while it runs, and after the
        learner closed it normally)."""
        self._context = context
        self._model_id = model_id
        self._current_model = current_model
        self._on_applied = on_applied
        self.gate = PolicyGate()
        _materialize(model, torch.device("cuda", torch.cuda.current_device())
                     if info.backend == "nccl" else torch.device("cpu"))
        gate = self.gate
        receiver = WeightReceiver(
            model, info, collector_id, timeout=timeout, secret=secret,
            hooks=ReceiverHooks(after_receive=lambda version, buffer: gate.arrived.set()))
        self.end = WorkerEnd(receiver, model, worker)
        self._model: Any = model  # gated once connected, then not held here
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def connect(self, worker_idx: int, timeout: float) -> int:
        """Initial sync, then the background thread starts; the version applied."""
        try:
            version = self.end.setup_connection_and_weights_on_receiver(
                worker_idx=worker_idx, timeout=timeout)
        except BaseException:
            self.end.close()
            raise
        self._on_applied(version)  # torchrl does not count the initial sync
        self.gate.arrived.clear()  # the initial version is applied already
        self.gate.guard(self._model)
        self._model = None
        self._thread = threading.Thread(target=self._receive_loop, daemon=True,
                                        name=f"weight-sync-torchrl-rx-{self.worker}")
        self._thread.start()
        log.info("torchrl worker %d connected at version %d over %r", self.worker, version,
                 self.end.receiver.transport)
        return version

    @property
    def running(self) -> bool:
        """The background thread applies the versions (``receive`` need not)."""
        return self._thread is not None and self._thread.is_alive()

    def receive(self, timeout: float) -> int | None:
        """Apply a new version now (waiting up to ``timeout``); the version, or ``None``.

        Raises:
            WeightSyncError: what ended the background stream.
        """
        if self.error is not None:
            raise self.error
        return self._apply(timeout)

    def close(self) -> None:
        """Stop the thread (within one slice), ungate the policy, close the receiver."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(2.0)
        self.gate.remove()
        try:
            self.end.close()
        except Exception as exc:  # the learner may be gone already
            log.debug("closing worker %d's receiver: %r", self.worker, exc)

    def _apply(self, wait: float) -> int | None:
        """Apply the next version (waiting up to ``wait``), between two policy calls;
        then torchrl's bookkeeping. The version applied, or ``None``."""
        with self.gate.lock:
            version = self.end.receive_weights(wait)
            if version is None:
                return None
            model = self._current_model()  # read now: torchrl may have re-pointed it
            if model is not None:
                self.gate.guard(model)
                self.end.follow(model)
            self._cascade(version, model)
        self._on_applied(version)
        return version

    def _receive_loop(self) -> None:
        """Apply every new version as it arrives, then tell the worker's collector."""
        while not self._stop.is_set():
            try:
                arrived = self.gate.arrived.wait(_POLL_S)
                self.gate.arrived.clear()
                # Polled too without an arrival: errors reach the queue without one.
                self._apply(_ARRIVAL_S if arrived else 0)
            except ClosedError:
                log.info("torchrl worker %d: the learner closed the weight stream",
                         self.worker)
                return
            except BaseException as exc:
                if isinstance(exc, WeightSyncError):
                    self.error = exc
                else:
                    log.exception("torchrl worker %d: applying weights failed",
                                  self.worker)
                    self.error = WeightSyncError(f"torchrl worker {self.worker}: applying "
                                                 f"weights failed: {exc!r}")
                    self.error.__cause__ = exc
                log.warning("torchrl worker %d: weight stream ended: %s", self.worker,
                            self.error)
                # Say so now: the learner's next wait reports this worker at once.
                with contextlib.suppress(Exception):
                    self.end.close()
                return

    def _cascade(self, version: int, model: Any) -> None:
        """torchrl's bookkeeping after an apply: the worker collector's
        ``update_policy_weights_`` (bumps its ``PolicyVersion``), then the version set
        to exactly ours, should an update have been collapsed into a newer one."""
        context = self._context()
        update = getattr(context, "update_policy_weights_", None)
        if not callable(update) or self._model_id != "policy":
            return  # policy_version counts the policy's versions only
        if _is_leaf_collector_of(context, model):
            # torchrl's Collector.update_policy_weights_ would copy `model` onto itself
            # (7 ms for 300 leaves), then call increment_version(): only the latter.
            context.increment_version()
        else:  # e.g. a MultiSyncCollector node of a DistributedCollector: cascade
            weights = TensorDict.from_module(model) if isinstance(model, nn.Module) else model
            update(model_id=self._model_id, policy_or_weights=weights)
        tracker = getattr(context, "policy_version_tracker", None)
        current = getattr(tracker, "version", None)
        if (tracker is not None and isinstance(current, int)
                and not isinstance(current, bool) and current != version):
            tracker.version = version


def _materialize(model: Any, device: torch.device) -> None:
    """Give meta tensors (torchrl pickles the policy into its workers without its
    weights) real, uninitialised storage on ``device``: the initial sync fills them."""
    leaves = named_leaves(model)
    if not any(t.is_meta for t in leaves.values()):
        return
    if isinstance(model, nn.Module):
        model.to_empty(device=device)
    elif isinstance(model, TensorDictBase):
        for key, tensor in list(model.items(include_nested=True, leaves_only=True)):
            if tensor.is_meta:
                model.set(key, torch.empty_like(tensor, device=device))
    else:
        for key, tensor in leaves.items():
            if tensor.is_meta:
                model[key] = torch.empty_like(tensor, device=device)


def _is_leaf_collector_of(context: Any, model: Any) -> bool:
    """``context`` is a single-process torchrl ``Collector`` acting with ``model`` and
    syncing no sub-collectors: its ``update_policy_weights_(model)`` is a self-copy
    followed by ``increment_version()``."""
    try:
        from torchrl.collectors import Collector
    except ImportError:
        return False
    return (type(context) is Collector and model is not None
            and getattr(context, "_policy_w_state_dict", None) is model
            and not getattr(context, "_weight_sync_schemes", None)
            and callable(getattr(context, "increment_version", None)))
