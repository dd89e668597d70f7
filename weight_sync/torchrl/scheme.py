"""The torchrl ``WeightSyncScheme`` over weight-sync (see :mod:`weight_sync.torchrl`)."""

from __future__ import annotations

import contextlib
import logging
import multiprocessing.util
import threading
import time
import weakref
from collections.abc import Iterable
from typing import Any

import torch
from tensordict import TensorDict, TensorDictBase
from torch import nn
from torchrl.weight_update.weight_sync_schemes import WeightSyncScheme

from weight_sync.config import ConnectionInfo, SenderConfig
from weight_sync.errors import (
    ClosedError,
    CollectorFailed,
    ConfigError,
    ProtocolError,
    WeightSyncError,
    WeightSyncTimeout,
)
from weight_sync.hooks import ReceiverHooks
from weight_sync.layout import named_leaves
from weight_sync.metrics import AckResult
from weight_sync.receiver import WeightReceiver
from weight_sync.sender import WeightSender
from weight_sync.torchrl.ends import LearnerEnd, WorkerEnd
from weight_sync.torchrl.gate import PolicyGate
from weight_sync.transports.registry import get_transport

__all__ = ["WeightSyncTorchRLScheme"]

log = logging.getLogger(__name__)

# The worker's background thread waits for the next version in slices this long, so
# shutdown() stops it within one slice.
_POLL_S = 0.1
# While the learner connects, the worker processes are checked this often.
_WATCH_S = 0.05
# Once a version has arrived, it is in the receiver's hand-off queue within this long.
_ARRIVAL_S = 0.5



class WeightSyncTorchRLScheme(WeightSyncScheme):
    """A torchrl ``WeightSyncScheme`` whose weights travel over weight-sync.

    Args:
        transport: a registered weight-sync transport (``"distributed"``: gloo/nccl
            sends; ``"shm"``: same-host shared memory; or one of your own, registered in
            the learner *and* in the workers, e.g. at import of the module that defines
            the env factory).
        per_worker_senders: one :class:`WeightSender` per worker, so that
            ``update_policy_weights_(worker_ids=...)`` updates only those workers (each
            worker then has its own version stream). With the default ``False`` one
            sender serves all workers (one snapshot per update, whatever N) and a strict
            subset of ``worker_ids`` is refused with :class:`ConfigError`.
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

    Raises:
        ConfigError: an unknown transport (the registered ones are listed) or a bad
            setting.
    """

    def __init__(self, transport: str = "distributed", *, per_worker_senders: bool = False,
                 timeout: float = 60.0, connect_timeout: float = 120.0,
                 ack_timeout: float = 60.0, liveness_timeout: float = 10.0,
                 backend: str = "gloo", host: str = "127.0.0.1", name: str = "policy",
                 strategy: str = "tensordict") -> None:
        super().__init__(strategy)
        get_transport(transport)  # ConfigError listing the registered ones
        self._config = SenderConfig(host=host, name=name, backend=backend, timeout=timeout,
                                    liveness_timeout=liveness_timeout, transport=transport)
        for label, value in (("connect_timeout", connect_timeout),
                             ("ack_timeout", ack_timeout)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"WeightSyncTorchRLScheme.{label} must be a positive "
                                  f"number of seconds, got {value!r}")
        self.transport = transport
        self.per_worker_senders = bool(per_worker_senders)
        self.connect_timeout = float(connect_timeout)
        self.ack_timeout = float(ack_timeout)
        self.num_workers = 0
        self.infos: list[ConnectionInfo] = []
        """What the workers connect with (one per sender); pickled into the workers."""
        self.last_acks: dict[int, AckResult] = {}
        """Learner side: the last :class:`AckResult` of each sender (by first worker)."""
        self.error: WeightSyncError | None = None
        """Worker side: what ended the background stream (``None`` while it runs, and
        after the learner closed it normally)."""
        self._worker_offset = 0  # DistributedCollector's workers are ranks 1..N
        self._ends: list[LearnerEnd] | None = None
        self._worker_end: WorkerEnd | None = None
        self._rx_thread: threading.Thread | None = None
        self._rx_stop: threading.Event | None = None
        self._gate: PolicyGate | None = None
        # Per worker, the newest version its collector finished update_policy_weights_
        # for (shared memory, from torchrl's multiprocessing context; None without one).
        self._bumped: list[Any] | None = None
        self._shut_down = False

    # -- pickling: only what a worker needs to connect --------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        for key in ("_ends", "_worker_end", "_rx_thread", "_rx_stop", "_gate",
                    "_sender_transports",
                    "_receiver_transport", "_shared_transport", "error"):
            state[key] = None
        state["last_acks"] = {}
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
        if context is not None:
            self.context = context
        source = self._sender_source(context, model_id, model, weights)
        if num_workers is None:
            num_workers = getattr(context, "num_workers", None)
        if not isinstance(num_workers, int) or num_workers < 1:
            raise ConfigError(f"WeightSyncTorchRLScheme: the number of workers must be an "
                              f"int >= 1 (from the collector or num_workers=), got "
                              f"{num_workers!r}")
        self.num_workers = num_workers
        self._worker_offset = 1 if _is_distributed_collector(context) else 0
        ends: list[LearnerEnd] = []
        try:
            if self.per_worker_senders:
                for w in range(num_workers):
                    ends.append(LearnerEnd(WeightSender(source, 1, self._config), [w]))
            else:
                ends.append(LearnerEnd(WeightSender(source, num_workers, self._config),
                                       range(num_workers)))
        except BaseException:
            _close_ends(ends)
            raise
        self._ends = ends
        self.infos = [end.connection_info for end in ends]
        if ctx is None and self._worker_offset and getattr(context, "launcher", "") == "mp":
            ctx = multiprocessing.get_context("spawn")  # its nodes are local processes too
        if ctx is not None:  # pickled into the workers by torchrl as they are spawned
            self._bumped = [ctx.Value("q", -1, lock=False) for _ in range(num_workers)]
        for end in ends:
            for w in end.workers:
                self._register_worker_sender(worker_idx=w, transport=end)
        if context is not None:
            # torchrl's multi-process collectors do not shut their schemes down:
            # release the senders (store, sockets, segments) at the latest when the
            # collector goes.
            weakref.finalize(context, _close_ends, list(ends))
        log.info("torchrl scheme: %d sender(s) for %d worker(s) over %r, layout %s",
                 len(ends), num_workers, self.transport, ends[0].sender.layout.digest)

    def _sender_source(self, context: Any, model_id: str, model: Any, weights: Any) -> Any:
        """The learner's weights: a model or weights given, else the collector's."""
        if model is not None:
            return model
        if weights is not None:
            return weights
        found = None
        if context is not None:
            get_model = getattr(context, "get_model", None)
            with contextlib.suppress(AttributeError, KeyError, ValueError):
                found = get_model(model_id) if callable(get_model) else getattr(
                    context, model_id)
            if found is None and model_id == "policy":
                found = getattr(context, "_fallback_policy", None)
            if found is None and model_id == "policy":
                factories = getattr(context, "policy_factory", None) or ()
                if callable(factories):
                    factories = [factories]
                first = next((f for f in factories if f is not None), None)
                found = first() if first is not None else None
        if found is None:
            raise ConfigError(f"WeightSyncTorchRLScheme: no weights for model "
                              f"{model_id!r} (give model=/weights= to init_on_sender, or a "
                              f"collector that holds the model)")
        return found

    def _require_ends(self, what: str) -> list[LearnerEnd]:
        if self._shut_down:
            raise ClosedError(f"WeightSyncTorchRLScheme.{what}() after shutdown()")
        if self._ends is None:
            raise ProtocolError(f"WeightSyncTorchRLScheme.{what}() on a scheme not "
                                f"initialized on the sender")
        return self._ends

    def _setup_connection_and_weights_on_sender_impl(
        self, *, worker_idx: int | None = None, weights: Any = None,
    ) -> None:
        ends = self._require_ends("connect")
        self._connect_ends(ends, self.connect_timeout)
        if weights is not None:
            self.send(weights)

    def _connect_ends(self, ends: list[LearnerEnd], timeout: float) -> None:
        """Connect every end (in threads) while watching the worker processes, so one
        that dies before connecting is reported at once instead of after ``timeout``."""
        errors: dict[int, BaseException] = {}

        def run(i: int, end: LearnerEnd) -> None:
            try:
                end.setup_connection_and_weights_on_sender(timeout)
            except BaseException as exc:
                errors[i] = exc

        threads = [threading.Thread(target=run, args=(i, end), daemon=True,
                                    name=f"weight-sync-torchrl-connect-{i}")
                   for i, end in enumerate(ends)]
        for thread in threads:
            thread.start()
        start = time.monotonic()
        pending = set(range(len(ends)))
        while pending:
            for i in sorted(pending):
                threads[i].join(_WATCH_S / len(pending))
                if not threads[i].is_alive():
                    pending.discard(i)
            if errors:
                break
            dead = self._dead_worker([w for i in pending for w in ends[i].workers])
            if dead is not None:
                worker, why = dead
                self.shutdown()
                raise CollectorFailed(f"torchrl worker {worker} {why} before connecting "
                                      f"(after {time.monotonic() - start:.2f}s)", worker)
        if errors:
            first = errors[min(errors)]
            self.shutdown()
            raise first

    def _dead_worker(self, workers: Iterable[int]) -> tuple[int, str] | None:
        """A worker process (of a local multi-process collector) that ended, and how."""
        procs = getattr(self.context, "procs", None) or []
        pipes = getattr(self.context, "pipes", None) or []
        for w in workers:
            if w >= len(procs) or procs[w].exitcode is None:
                continue
            why = f"exited ({_describe_exit(procs[w].exitcode)})"
            # A worker that raised while starting reports it on its pipe.
            with contextlib.suppress(Exception):
                if w < len(pipes) and pipes[w].poll(0):
                    msg = pipes[w].recv()
                    if isinstance(msg, dict) and msg.get("error"):
                        why += f": {msg.get('exception_type')}: {msg.get('exception_msg')}"
            return w, why
        return None

    def _worker_list(self, worker_ids: Any) -> list[int]:
        """torchrl's ``worker_ids`` (None, an int, devices, or a list) as indices."""
        n = self.num_workers
        if worker_ids is None:
            return list(range(n))
        items = worker_ids if isinstance(worker_ids, (list, tuple, set, range)) else [
            worker_ids]
        out: set[int] = set()
        for w in items:
            if isinstance(w, (torch.device, str)):
                devices = getattr(self.context, "policy_device", None) or []
                match = [i for i, d in enumerate(devices)
                         if d is not None and torch.device(d) == torch.device(w)]
                if not match:
                    raise ConfigError(f"worker_ids: no worker's policy is on device {w!r}")
                out.update(match)
            elif isinstance(w, int) and not isinstance(w, bool) and 0 <= w < n:
                out.add(w)
            else:
                raise ConfigError(f"worker_ids must be ints in [0, {n}) (or devices), got "
                                  f"{worker_ids!r}")
        return sorted(out)

    def send(self, weights: Any = None, worker_ids: Any = None) -> None:
        """Send the weights to the workers (all, or ``worker_ids``) and return once each
        of them applied them: what ``collector.update_policy_weights_()`` calls.

        Args:
            weights: ``None`` (the learner's live policy), an ``nn.Module``, a TensorDict
                or a ``state_dict`` of the same layout; with ``per_worker_senders``, also
                a ``{worker: weights}`` dict.
            worker_ids: which workers (``None``: all).

        Raises:
            ConfigError: a strict subset of workers without ``per_worker_senders``, or
                bad ``worker_ids``.
            CollectorFailed: a worker died or its link broke (its index is
                ``collector_id``); the others were still waited for.
            WeightSyncTimeout: a worker did not apply it within ``ack_timeout``.
            LayoutMismatchError: ``weights`` do not match the policy's layout.
        """
        if not self.initialized_on_sender or not self.synchronized_on_sender:
            raise ProtocolError("WeightSyncTorchRLScheme.send() before init_on_sender() and "
                                "connect()")
        ends = self._require_ends("send")
        per_worker = (isinstance(weights, dict) and bool(weights)
                      and all(isinstance(k, int) for k in weights))
        if per_worker:
            if worker_ids is not None:
                raise ConfigError("send(): give per-worker weights or worker_ids, not both")
            workers = self._worker_list(sorted(weights))
        else:
            workers = self._worker_list(worker_ids)
        if not self.per_worker_senders and (per_worker or workers != list(range(
                self.num_workers))):
            what = "per-worker weights" if per_worker else f"worker_ids={worker_ids!r}"
            raise ConfigError(
                f"{what}: this scheme serves all {self.num_workers} workers with one "
                f"sender and cannot update only some of them; build it with "
                f"WeightSyncTorchRLScheme(per_worker_senders=True) for that")
        targets = [end for end in ends if set(end.workers) & set(workers)]
        for end in targets:
            chosen = weights[end.workers[0]] if per_worker else weights
            end.send_weights_async(self._resolve_weights(chosen))
        deadline = time.monotonic() + self.ack_timeout
        first: WeightSyncError | None = None
        applied: dict[int, int] = {}  # worker -> version it acked
        for end in targets:  # every end is waited for, even after one failed
            result: Any
            try:
                result = end.wait_ack(max(deadline - time.monotonic(), 0.001))
            except WeightSyncError as exc:
                first = first or exc
                result = getattr(exc, "result", None)
            if isinstance(result, AckResult):
                self.last_acks[end.workers[0]] = result
                applied.update({end.workers[c]: result.version for c in result.acked
                                if end.workers[c] in workers})
        try:
            self._wait_bumped(applied, deadline)
        except WeightSyncError as exc:
            first = first or exc
        if first is not None:
            raise first

    def _wait_bumped(self, applied: dict[int, int], deadline: float) -> None:
        """Wait until each worker's collector counted the version it acked.

        A worker acks as it applies, then its background thread calls torchrl's
        ``update_policy_weights_`` (which bumps ``policy_version``): without this wait a
        MultiSync worker could start its next rollout, with the new weights, before
        its frames are tagged with the new version.
        """
        if self._bumped is None:
            return
        start = time.monotonic()
        pending = dict(applied)
        while pending:
            for w, v in list(pending.items()):
                if self._bumped[w].value >= v:
                    del pending[w]
            if not pending:
                return
            dead = self._dead_worker(pending)
            if dead is not None:
                raise CollectorFailed(f"torchrl worker {dead[0]} {dead[1]} after applying "
                                      f"version {pending[dead[0]]}", dead[0])
            if time.monotonic() >= deadline:
                raise WeightSyncTimeout(
                    f"torchrl worker(s) {sorted(pending)} applied their version but their "
                    f"collector's update_policy_weights_ did not finish within "
                    f"{time.monotonic() - start:.2f}s")
            time.sleep(0.0002)

    def _resolve_weights(self, weights: Any) -> Any:
        if isinstance(weights, str):  # torchrl allows a model's attribute path
            return getattr(self.context, weights)
        return weights

    @property
    def senders(self) -> list[WeightSender]:
        """Learner side: the :class:`WeightSender` (one per worker with
        ``per_worker_senders``), e.g. for their ``stats``."""
        return [end.sender for end in self._ends or []]

    @property
    def versions(self) -> dict[int, int]:
        """The version each worker holds: learner side, the last sent to it (applied
        once ``send`` returned); worker side, ``{worker: version applied}``."""
        if self._worker_end is not None:
            return {self._worker_end.worker: self._worker_end.version}
        return {w: end.version for end in self._ends or [] for w in end.workers}

    # -- worker side ------------------------------------------------------------------
    def _init_on_receiver_impl(self, *, model_id: str = "policy", context: Any = None,
                               model: Any = None, worker_idx: int | None = None,
                               **unused: Any) -> None:
        self.model_id = model_id
        if context is not None:
            self.context = context
            if model is None:
                get_model = getattr(context, "get_model", None)
                model = get_model(model_id) if callable(get_model) else getattr(
                    context, model_id)
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
        if not 0 <= worker < self.num_workers or not self.infos:
            raise ConfigError(f"WeightSyncTorchRLScheme: worker {worker} (worker_idx "
                              f"{rank}) outside the {self.num_workers} worker(s) the "
                              f"learner built this scheme for")
        info, collector_id = ((self.infos[worker], 0) if self.per_worker_senders
                              else (self.infos[0], worker))
        model = self._current_model()
        if model is None:
            raise ConfigError(f"WeightSyncTorchRLScheme: worker {worker} has no model "
                              f"{self.model_id!r} to apply weights to")
        _materialize(model, torch.device("cuda", torch.cuda.current_device())
                     if info.backend == "nccl" else torch.device("cpu"))
        gate = PolicyGate()
        receiver = WeightReceiver(
            model, info, collector_id, timeout=self._config.timeout,
            secret=self._config.secret,  # the scheme travels to its workers by pickle
            hooks=ReceiverHooks(after_receive=lambda version, buffer: gate.arrived.set()))
        end = WorkerEnd(receiver, model, worker)
        self._worker_end = end
        try:
            version = end.setup_connection_and_weights_on_receiver(
                worker_idx=rank, timeout=self.connect_timeout)
        except BaseException:
            self._worker_end = None
            end.close()
            raise
        self._mark_bumped(worker, version)  # torchrl does not count the initial sync
        gate.arrived.clear()  # the initial version is applied already
        gate.guard(model)
        self._gate = gate
        stop = threading.Event()
        self._rx_stop = stop
        self._rx_thread = threading.Thread(target=self._receive_loop, args=(end, gate, stop),
                                           daemon=True,
                                           name=f"weight-sync-torchrl-rx-{worker}")
        self._rx_thread.start()
        # A worker process ends without collecting this scheme (its thread holds it):
        # close the receiver at the process's exit, so the learner hears the goodbye.
        multiprocessing.util.Finalize(None, self.shutdown, exitpriority=50)
        log.info("torchrl worker %d connected at version %d over %r", worker, version,
                 receiver.transport)

    @property
    def model(self) -> Any:
        return WeightSyncScheme.model.fget(self)

    @model.setter
    def model(self, value: Any) -> None:
        # torchrl re-points the model after a device cast (in the worker's main thread,
        # before its first rollout): gate that one's calls too.
        WeightSyncScheme.model.fset(self, value)
        gate = getattr(self, "_gate", None)
        if gate is not None:
            gate.guard(value)

    def _current_model(self) -> Any:
        try:
            return self.model
        except (AttributeError, KeyError):
            return None

    def _apply(self, end: WorkerEnd, gate: PolicyGate, wait: float) -> int | None:
        """Apply the next version (waiting up to ``wait``), between two policy calls;
        then torchrl's bookkeeping. The version applied, or ``None``."""
        with gate.lock:
            version = end.receive_weights(wait)
            if version is None:
                return None
            model = self._current_model()  # read now: torchrl may have re-pointed it
            if model is not None:
                gate.guard(model)
                end.follow(model)
            self._cascade(version)
        self._mark_bumped(end.worker, version)
        return version

    def _receive_loop(self, end: WorkerEnd, gate: PolicyGate, stop: threading.Event) -> None:
        """Apply every new version as it arrives, then tell the worker's collector."""
        while not stop.is_set():
            try:
                arrived = gate.arrived.wait(_POLL_S)
                gate.arrived.clear()
                # Polled too without an arrival: errors reach the queue without one.
                self._apply(end, gate, _ARRIVAL_S if arrived else 0)
            except ClosedError:
                log.info("torchrl worker %d: the learner closed the weight stream",
                         end.worker)
                return
            except BaseException as exc:
                if isinstance(exc, WeightSyncError):
                    self.error = exc
                else:
                    log.exception("torchrl worker %d: applying weights failed", end.worker)
                    self.error = WeightSyncError(f"torchrl worker {end.worker}: applying "
                                                 f"weights failed: {exc!r}")
                    self.error.__cause__ = exc
                log.warning("torchrl worker %d: weight stream ended: %s", end.worker,
                            self.error)
                # Say so now: the learner's next wait reports this worker at once.
                with contextlib.suppress(Exception):
                    end.close()
                return

    def _cascade(self, version: int) -> None:
        """torchrl's bookkeeping after an apply: the worker collector's
        ``update_policy_weights_`` (bumps its ``PolicyVersion``), then the version set
        to exactly ours, should an update have been collapsed into a newer one."""
        context = self.context
        update = getattr(context, "update_policy_weights_", None)
        if not callable(update):
            return
        model = self._current_model()
        if _is_leaf_collector_of(context, model):
            # torchrl's Collector.update_policy_weights_ would copy `model` onto itself
            # (7 ms for 300 leaves), then call increment_version(): only the latter.
            context.increment_version()
        else:  # e.g. a MultiSyncCollector node of a DistributedCollector: cascade
            weights = TensorDict.from_module(model) if isinstance(model, nn.Module) else model
            update(model_id=self.model_id or "policy", policy_or_weights=weights)
        tracker = getattr(context, "policy_version_tracker", None)
        current = getattr(tracker, "version", None)
        if (tracker is not None and isinstance(current, int)
                and not isinstance(current, bool) and current != version):
            tracker.version = version

    def _mark_bumped(self, worker: int, version: int) -> None:
        if self._bumped is not None:
            self._bumped[worker].value = version

    def receive(self, timeout: float | None = None) -> int | None:
        """Apply new weights now (for loops that call it); ``None`` while the background
        thread applies them (it always runs after ``connect``). Returns the version."""
        if self._worker_end is None:
            raise ProtocolError("WeightSyncTorchRLScheme.receive() before connect() on "
                                "a worker")
        if self._rx_thread is not None and self._rx_thread.is_alive():
            return None
        if self.error is not None:
            raise self.error
        assert self._gate is not None
        return self._apply(self._worker_end, self._gate, 0 if timeout is None else timeout)

    def create_transport(self, **kwargs: Any) -> LearnerEnd | WorkerEnd:
        """The end built by ``init_on_sender`` / ``connect`` (torchrl's abstract hook)."""
        if self._worker_end is not None:
            return self._worker_end
        if self._ends:
            return self._ends[0]
        raise ProtocolError("WeightSyncTorchRLScheme: its ends are built by "
                            "init_on_sender() (learner) and connect() (worker)")

    # -- both -------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Stop the worker's background thread and close the receiver, or close the
        learner's senders (in parallel); bounded, idempotent."""
        if getattr(self, "_shut_down", True):
            return
        self._shut_down = True
        stop, thread = getattr(self, "_rx_stop", None), getattr(self, "_rx_thread", None)
        if stop is not None:
            stop.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join(2.0)
        gate = getattr(self, "_gate", None)
        if gate is not None:
            gate.remove()
        end = getattr(self, "_worker_end", None)
        if end is not None:
            try:
                end.close()
            except Exception as exc:  # the learner may be gone already
                log.debug("closing worker %d's receiver: %r", end.worker, exc)
        _close_ends(getattr(self, "_ends", None) or [])
        super().shutdown()



def _close_ends(ends: list[LearnerEnd]) -> None:
    """Close the senders in parallel (each waits briefly for its workers' goodbyes)."""

    def close(end: LearnerEnd) -> None:
        try:
            end.close()
        except Exception as exc:
            log.warning("closing the sender of torchrl worker(s) %s: %r", end.workers, exc)

    if len(ends) == 1:
        close(ends[0])
        return
    threads = [threading.Thread(target=close, args=(end,), daemon=True) for end in ends]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30.0)


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


def _is_distributed_collector(context: Any) -> bool:
    if context is None:
        return False
    try:
        from torchrl.collectors.distributed import DistributedCollector
    except ImportError:
        return False
    return isinstance(context, DistributedCollector)


def _describe_exit(code: int | None) -> str:
    if code is not None and code < 0:
        return f"killed by signal {-code}"
    return f"exit code {code}"

