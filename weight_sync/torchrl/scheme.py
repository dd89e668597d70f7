"""The torchrl ``WeightSyncScheme`` over weight-sync (see :mod:`weight_sync.torchrl`).

The scheme is one object because torchrl pickles it from the learner into each worker;
its two roles live apart: :class:`~weight_sync.torchrl.learner_role.SchemeLearner` on
the learner, :class:`~weight_sync.torchrl.worker_role.SchemeWorker` in a worker.
"""

from __future__ import annotations

import logging
import multiprocessing.util
import weakref
from typing import Any

from torchrl.weight_update.weight_sync_schemes import WeightSyncScheme

from weight_sync.config import ConnectionInfo, SenderConfig
from weight_sync.errors import ClosedError, ConfigError, ProtocolError, WeightSyncError
from weight_sync.learner.sender import WeightSender
from weight_sync.metrics import AckResult
from weight_sync.torchrl.context import (
    has_weights,
    is_distributed_collector,
    model_at,
    refuse_in_process,
    sender_source,
)
from weight_sync.torchrl.ends import LearnerEnd, WorkerEnd
from weight_sync.torchrl.learner_role import SchemeLearner
from weight_sync.torchrl.worker_role import SchemeWorker
from weight_sync.transports.registry import sender_chain

__all__ = ["WeightSyncTorchRLScheme"]

log = logging.getLogger(__name__)


class WeightSyncTorchRLScheme(WeightSyncScheme):
    """A torchrl ``WeightSyncScheme`` whose weights travel over weight-sync.

    Args:
        transport: ``"auto"`` (the default: each worker placed on the best transport
            it proves it can use, see :attr:`SenderConfig.transport
            <weight_sync.config.SenderConfig.transport>`), or a registered weight-sync
            transport (``"distributed"``: gloo/nccl sends; ``"shm"``: same-host shared
            memory; or one of your own, registered in the learner *and* in the workers,
            e.g. at import of the module that defines the env factory).
        weights: the learner's copy of a model that lives only in the workers (an env
            or replay-buffer transform's module, e.g. for the key
            ``"env.transform[0].module"``): its layout is what the workers' models are
            checked against. Not needed for the policy, nor for a model the collector
            holds on the learner (found at the key's path, as torchrl's schemes do).
        timeout: bound on each store operation and transfer (both sides), seconds.
        connect_timeout: bound on the initial connect (the workers start, import
            torchrl, build their env and policy meanwhile), seconds.
        ack_timeout: bound on one ``update_policy_weights_()``, seconds.
        liveness_timeout: a worker whose heartbeat stopped this long is failed (a
            same-host worker's death is seen from its pid at once), seconds.
        backend: ``"gloo"`` (CPU buffers) or ``"nccl"`` (CUDA buffers).
        host: the interface the learner's store binds (loopback by default; workers on
            other hosts, as with ``DistributedCollector``, need a reachable one).
        name: name of the weight stream.
        strategy: torchrl's strategy argument (kept for compatibility; unused).

    One :class:`WeightSender` serves all workers: ``update_policy_weights_(w,
    worker_ids=[...])`` sends ``w`` to those workers only (the others keep theirs, and
    their ``policy_version`` does not move); a ``{worker: weights}`` dict sends each
    worker its own. Version numbers are the sender's one counter, so a
    ``policy_version`` names one set of weights whichever worker tagged it.

    A policy without weights (e.g. torchrl's ``RandomPolicy``) has nothing to sync: the
    scheme then starts no sender, and updates do nothing. A single in-process
    ``Collector`` (no worker processes) is refused: it acts with the learner's own
    policy, so there is nothing to sync.

    Raises:
        ConfigError: an unknown transport (the registered ones are listed) or a bad
            setting.
    """

    def __init__(self, transport: str = "auto", *, weights: Any = None,
                 timeout: float = 60.0, connect_timeout: float = 120.0,
                 ack_timeout: float = 60.0, liveness_timeout: float = 10.0,
                 backend: str = "gloo", host: str = "127.0.0.1", name: str = "policy",
                 strategy: str = "tensordict") -> None:
        super().__init__(strategy)
        self._config = SenderConfig(host=host, name=name, backend=backend, timeout=timeout,
                                    liveness_timeout=liveness_timeout, transport=transport)
        sender_chain(self._config)  # ConfigError listing the registered ones
        for label, value in (("connect_timeout", connect_timeout),
                             ("ack_timeout", ack_timeout)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"WeightSyncTorchRLScheme.{label} must be a positive "
                                  f"number of seconds, got {value!r}")
        self.transport = transport
        self._weights = weights  # never pickled into the workers (__getstate__)
        self.weightless = False
        """The model has no weights (nothing is synced; set by ``init_on_sender``)."""
        self.connect_timeout = float(connect_timeout)
        self.ack_timeout = float(ack_timeout)
        self.num_workers = 0
        self.infos: list[ConnectionInfo] = []
        """What the workers connect with (one per sender); pickled into the workers."""
        self._worker_offset = 0  # DistributedCollector's workers are ranks 1..N
        self._learner: SchemeLearner | None = None
        self._worker: SchemeWorker | None = None
        # Per worker, the newest version its collector finished update_policy_weights_
        # for (shared memory, from torchrl's multiprocessing context; None without one).
        self._bumped: list[Any] | None = None
        self._shut_down = False

    # -- pickling: only what a worker needs to connect --------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        for key in ("_learner", "_worker", "_sender_transports", "_receiver_transport",
                    "_shared_transport", "_weights"):
            state[key] = None
        state["_shut_down"] = False
        return state

    # -- learner side -----------------------------------------------------------------
    def _init_on_sender_impl(self, *, model_id: str = "policy", context: Any = None,
                             model: Any = None, weights: Any = None,
                             num_workers: int | None = None, ctx: Any = None,
                             **unused: Any) -> None:
        """Build the sender(s) now, so their ``ConnectionInfo`` exists before torchrl
        pickles this scheme into the workers."""
        self.model_id = model_id
        refuse_in_process(context)
        if context is not None:
            self.context = context
        source = sender_source(context, model_id, model,
                                weights if weights is not None else self._weights)
        if num_workers is None:
            num_workers = getattr(context, "num_workers", None)
        if not isinstance(num_workers, int) or num_workers < 1:
            raise ConfigError(f"WeightSyncTorchRLScheme: the number of workers must be an "
                              f"int >= 1 (from the collector or num_workers=), got "
                              f"{num_workers!r}")
        self.num_workers = num_workers
        self._worker_offset = 1 if is_distributed_collector(context) else 0
        if not has_weights(source):
            self.weightless = True
            log.info("torchrl scheme: model %r (%s) has no weights: nothing to sync",
                     model_id, type(source).__name__)
            return
        if ctx is None and self._worker_offset and getattr(context, "launcher", "") == "mp":
            ctx = multiprocessing.get_context("spawn")  # its nodes are local processes too
        if ctx is not None:  # pickled into the workers by torchrl as they are spawned
            self._bumped = [ctx.Value("q", -1, lock=False) for _ in range(num_workers)]
        learner = SchemeLearner(source, num_workers, self._config, context=context,
                                bumped=self._bumped)
        self._learner = learner
        self.infos = learner.infos
        for w in range(num_workers):
            self._register_worker_sender(worker_idx=w, transport=learner.end)
        if context is not None:
            # torchrl's multi-process collectors do not shut their schemes down:
            # release the sender (store, sockets, segments) at the latest when the
            # collector goes.
            weakref.finalize(context, learner.end.close)
        log.info("torchrl scheme: one sender for %d worker(s) over %r, layout %s",
                 num_workers, self.transport, learner.end.sender.layout.digest)

    def _require_learner(self, what: str) -> SchemeLearner:
        if self._shut_down:
            raise ClosedError(f"WeightSyncTorchRLScheme.{what}() after shutdown()")
        if self._learner is None:
            raise ProtocolError(f"WeightSyncTorchRLScheme.{what}() on a scheme not "
                                f"initialized on the sender")
        return self._learner

    def _setup_connection_and_weights_on_sender_impl(
        self, *, worker_idx: int | None = None, weights: Any = None,
    ) -> None:
        if self.weightless:
            return
        learner = self._require_learner("connect")
        try:
            learner.connect(self.connect_timeout)
        except BaseException:
            self.shutdown()
            raise
        if weights is not None:
            self.send(weights)

    def send(self, weights: Any = None, worker_ids: Any = None) -> None:
        """Send the weights to the workers (all, or ``worker_ids``) and return once each
        of them applied them: what ``collector.update_policy_weights_()`` calls.

        Args:
            weights: ``None`` (the learner's live policy), an ``nn.Module``, a TensorDict
                or a ``state_dict`` of the same layout, or a ``{worker: weights}`` dict
                (each worker its own).
            worker_ids: which workers (``None``: all); the others keep their weights
                and their ``policy_version``.

        Raises:
            ConfigError: bad ``worker_ids``.
            CollectorFailed: a worker died or its link broke (its index is
                ``collector_id``); the others were still waited for.
            WeightSyncTimeout: a worker did not apply it within ``ack_timeout``.
            LayoutMismatchError: ``weights`` do not match the policy's layout.
        """
        if not self.initialized_on_sender or not self.synchronized_on_sender:
            raise ProtocolError("WeightSyncTorchRLScheme.send() before init_on_sender() and "
                                "connect()")
        if self.weightless:
            if self._shut_down:
                raise ClosedError("WeightSyncTorchRLScheme.send() after shutdown()")
            return
        self._require_learner("send").send(weights, worker_ids, self.ack_timeout)

    @property
    def last_ack(self) -> AckResult | None:
        """Learner side: the :class:`AckResult` of the last update (``None`` before)."""
        return self._learner.last_ack if self._learner is not None else None

    @property
    def sender(self) -> WeightSender | None:
        """Learner side: the :class:`WeightSender` (e.g. for its ``stats``); ``None``
        for a weightless model."""
        return self._learner.end.sender if self._learner is not None else None

    @property
    def versions(self) -> dict[int, int]:
        """The version each worker holds: learner side, the last sent to it (applied
        once ``send`` returned); worker side, ``{worker: version applied}``."""
        if self._worker is not None:
            return {self._worker.worker: self._worker.end.version}
        return self._learner.versions if self._learner is not None else {}

    # -- worker side ------------------------------------------------------------------
    def _init_on_receiver_impl(self, *, model_id: str = "policy", context: Any = None,
                               model: Any = None, worker_idx: int | None = None,
                               **unused: Any) -> None:
        self.model_id = model_id
        if context is not None:
            self.context = context
            if model is None:
                model = model_at(context, model_id)
            if worker_idx is None:
                worker_idx = getattr(context, "worker_idx", None)
        if model is not None:
            self.model = model
        self.worker_idx = worker_idx

    def _setup_connection_and_weights_on_receiver_impl(
        self, *, worker_idx: int | None = None,
    ) -> None:
        rank = self.worker_idx if worker_idx is None else worker_idx
        if not isinstance(rank, int):
            raise ConfigError(f"WeightSyncTorchRLScheme: a worker needs its worker_idx, got "
                              f"{rank!r}")
        worker = rank - self._worker_offset
        if self.weightless:
            return
        if not 0 <= worker < self.num_workers or not self.infos:
            raise ConfigError(f"WeightSyncTorchRLScheme: worker {worker} (worker_idx "
                              f"{rank}) outside the {self.num_workers} worker(s) the "
                              f"learner built this scheme for")
        info, collector_id = self.infos[0], worker
        model = self._current_model()
        if model is None:
            raise ConfigError(f"WeightSyncTorchRLScheme: worker {worker} has no model "
                              f"{self.model_id!r} to apply weights to")
        bumped = self._bumped

        def applied(version: int) -> None:
            if bumped is not None:
                bumped[worker].value = version

        role = SchemeWorker(model, info, collector_id, worker,
                            context=lambda: getattr(self, "context", None),
                            model_id=self.model_id or "policy",
                            current_model=self._current_model, on_applied=applied,
                            timeout=self._config.timeout,
                            secret=self._config.secret)  # travels to workers by pickle
        role.connect(rank, self.connect_timeout)
        self._worker = role
        # A worker process ends without collecting this scheme (its thread holds it):
        # close the receiver at the process's exit, so the learner hears the goodbye.
        multiprocessing.util.Finalize(None, self.shutdown, exitpriority=50)

    @property
    def error(self) -> WeightSyncError | None:
        """Worker side: what ended the background stream (``None`` while it runs, and
        after the learner closed it normally)."""
        return self._worker.error if self._worker is not None else None

    @property
    def model(self) -> Any:
        return WeightSyncScheme.model.fget(self)

    @model.setter
    def model(self, value: Any) -> None:
        # torchrl re-points the model after a device cast (in the worker's main thread,
        # before its first rollout): gate that one's calls too.
        WeightSyncScheme.model.fset(self, value)
        worker = getattr(self, "_worker", None)
        if worker is not None:
            worker.gate.guard(value)

    def _current_model(self) -> Any:
        try:
            return self.model
        except (AttributeError, KeyError, ValueError):
            return None

    def receive(self, timeout: float | None = None) -> int | None:
        """Apply new weights now (for loops that call it); ``None`` while the background
        thread applies them (it always runs after ``connect``), or for a weightless
        model. Returns the version."""
        if self.weightless:
            return None
        if self._worker is None:
            raise ProtocolError("WeightSyncTorchRLScheme.receive() before connect() on "
                                "a worker")
        if self._worker.running:
            return None
        return self._worker.receive(0 if timeout is None else timeout)

    def create_transport(self, **kwargs: Any) -> LearnerEnd | WorkerEnd:
        """The end built by ``init_on_sender`` / ``connect`` (torchrl's abstract hook)."""
        if self._worker is not None:
            return self._worker.end
        if self._learner is not None:
            return self._learner.end
        raise ProtocolError("WeightSyncTorchRLScheme: its ends are built by "
                            "init_on_sender() (learner) and connect() (worker)")

    # -- both -------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Stop the worker's background thread and close the receiver, or close the
        learner's sender; bounded, idempotent."""
        if getattr(self, "_shut_down", True):
            return
        self._shut_down = True
        worker = getattr(self, "_worker", None)
        if worker is not None:
            worker.close()
        learner = getattr(self, "_learner", None)
        if learner is not None:
            learner.close()
        super().shutdown()
