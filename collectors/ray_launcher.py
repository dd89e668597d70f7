"""Collectors as Ray actors: :class:`RayLauncher` (needs the ``ray`` extra).

Each collector runs :func:`~weight_sync.collectors.worker.run_worker` on a thread of its
own Ray actor (:class:`CollectorActor`), placed in its own bundle of one placement group
(``strategy="SPREAD"`` by default: as many nodes as the cluster offers; ``"PACK"`` fills
one node first). Its messages (batches, reports) come back through Ray's object store as the
results of ``next_messages`` calls the learner keeps one of in flight per collector,
never through a local pipe, so a collector may run on any node of the cluster. It
connects its :class:`~weight_sync.WeightReceiver` to the learner's store like a local
process does, so the learner's ``SenderConfig.host`` must be an address the nodes reach.

Example (a local Ray, or a cluster joined with ``address="auto"``)::

    from weight_sync.collectors import CollectorGroup
    from weight_sync.collectors.ray_launcher import RayLauncher
    from weight_sync.collectors.task import collect, make_env, make_policy

    launcher = RayLauncher(init_kwargs={"num_cpus": 4})   # ray.init unless initialised
    with CollectorGroup(policy, make_env, make_policy, collect, num_collectors=2,
                        launcher=launcher, max_restarts=1) as group:
        print(launcher.get_all(launcher.run_all("node_info"), timeout=30))
        for batch in group:
            ...
    # the actors, their placement group (and a Ray the launcher started) are gone here

A dead actor (``ray.kill``, a lost node, a crashed worker process) ends that collector's
channel: the group raises :class:`~weight_sync.collectors.errors.CollectorDied` naming it,
or restarts it in the same bundle under ``max_restarts``. A placement group the cluster
cannot hold raises :class:`~weight_sync.collectors.errors.PlacementTimeout` after
``placement_timeout`` seconds.

Group calls as NeMo-RL's ``RayWorkerGroup``: :meth:`RayLauncher.run_all` (same arguments
everywhere) and :meth:`RayLauncher.run_each` (per collector) give futures, awaited within
a bound by :meth:`RayLauncher.get_all`.
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import RayActorError, RayError, RayTaskError
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from weight_sync.collectors.errors import (
    CollectorCrashed,
    CollectorDied,
    CollectorError,
    CollectorTimeout,
    PlacementTimeout,
    describe_exitcode,
)
from weight_sync.collectors.launcher import WorkerHandle
from weight_sync.collectors.ray_actor import ACTOR_METHODS, CollectorActor
from weight_sync.collectors.worker import WorkerSpec

from weight_sync.errors import ConfigError

__all__ = ["ACTOR_METHODS", "STRATEGIES", "CollectorActor", "RayLauncher", "RayLauncherConfig",
           "RayWorker"]  # the actor's two names re-exported from weight_sync.collectors.ray_actor

log = logging.getLogger(__name__)

STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
"""Ray's placement strategies for the collectors' bundles."""

_ACTOR_THREADS = 8  # the run loop, the pending next_messages, the small calls (credits...)
# After ray.kill, how long close() waits to learn the run loop's end (Ray: milliseconds).
_CLOSE_WAIT_S = 2.0


@dataclass(frozen=True)
class RayLauncherConfig:
    """How :class:`RayLauncher` places its collectors."""

    strategy: str = "SPREAD"
    """Placement strategy of the bundles, one of :data:`STRATEGIES`."""
    num_cpus: float = 1.0
    """CPUs reserved per collector (its bundle and its actor)."""
    num_gpus: float = 0.0
    """GPUs reserved per collector."""
    placement_timeout: float = 60.0
    """Seconds the cluster may take to reserve every bundle before :class:`PlacementTimeout`."""
    runtime_env: Mapping[str, Any] | None = None
    """Ray ``runtime_env`` of the actors (e.g. ``{"env_vars": {...}}``)."""

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"RayLauncherConfig.strategy must be one of {STRATEGIES}, "
                              f"got {self.strategy!r}")
        for name, least in (("num_cpus", None), ("num_gpus", 0), ("placement_timeout", None)):
            value = getattr(self, name)
            if (not isinstance(value, (int, float)) or isinstance(value, bool)
                    or not (value > 0 if least is None else value >= least)):
                raise ConfigError(f"RayLauncherConfig.{name} must be "
                                  f"{'> 0' if least is None else '>= 0'}, got {value!r}")

    @property
    def bundle(self) -> dict[str, float]:
        """The resources of one collector's bundle."""
        return {"CPU": float(self.num_cpus)} | (
            {"GPU": float(self.num_gpus)} if self.num_gpus else {})


_RemoteCollector = ray.remote(CollectorActor)


def _ready(ref: Any) -> bool:
    return bool(ray.wait([ref], timeout=0)[0])


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


class RayWorker:
    """The learner's handle on one :class:`CollectorActor` (see :class:`WorkerHandle`)."""

    def __init__(self, worker_id: int, actor: Any) -> None:
        self.worker_id = worker_id
        self.actor = actor
        """The actor handle (``ray.actor.ActorHandle``)."""
        self._run = actor.run.remote()
        self._pid_ref = actor.pid.remote()
        self._next: Any = actor.next_messages.remote()  # None once the channel ended
        self._buffer: deque[bytes | bytearray] = deque()
        self._pid: int | None = None
        self._exitcode: int | None = None
        self._death: str | None = None
        self._closed = False  # then nothing asks Ray any more (it may be shut down)

    @property
    def pid(self) -> int | None:
        if self._pid is None and not self._closed and _ready(self._pid_ref):
            with contextlib.suppress(RayError):
                self._pid = int(ray.get(self._pid_ref))
        return self._pid

    @property
    def exitcode(self) -> int | None:
        """The run loop's exit code; ``None`` while it runs or when the actor died."""
        if (self._exitcode is None and self._death is None and not self._closed
                and _ready(self._run)):
            try:
                self._exitcode = int(ray.get(self._run))
            except RayError as exc:
                self._death = f"actor died: {_one_line(exc)}"
        return self._exitcode

    def end_reason(self) -> str:
        code = self.exitcode
        if code is not None:
            return describe_exitcode(code)
        return self._death or "still running"

    @property
    def has_local(self) -> bool:
        """A :meth:`receive` would return or raise without asking Ray."""
        return bool(self._buffer) or self._next is None

    @property
    def run_ref(self) -> Any:
        """The ``run`` call: ready once the loop returned or the actor died."""
        return self._run

    @property
    def pending(self) -> Any:
        """The ``next_messages`` call in flight (``None`` once the channel ended)."""
        return self._next

    def receive(self) -> bytes | bytearray | None:
        if self._buffer:
            return self._buffer.popleft()
        if self._next is None:
            raise EOFError(f"collector {self.worker_id}: channel ended ({self.end_reason()})")
        if not _ready(self._next):
            return None
        ref, self._next = self._next, None
        try:
            messages = ray.get(ref)
        except RayError as exc:
            self._death = f"actor died: {_one_line(exc)}"
            raise EOFError(f"collector {self.worker_id}: {self._death}") from exc
        if not messages:
            raise EOFError(f"collector {self.worker_id}: channel closed")
        self._buffer.extend(messages)
        self._next = self.actor.next_messages.remote()
        return self._buffer.popleft()

    def is_alive(self) -> bool:
        return (not self._closed and self._death is None and self._next is not None
                and not _ready(self._run))

    def release_credit(self) -> None:
        self.actor.release_credit.remote()

    def request_stop(self) -> None:
        self.actor.request_stop.remote()

    def join(self, timeout: float) -> None:
        ray.wait([self._run], timeout=max(timeout, 0))

    def terminate(self) -> None:
        self.kill()  # an actor has no gentler stop than request_stop

    def kill(self) -> None:
        with contextlib.suppress(RayError, ValueError):
            ray.kill(self.actor, no_restart=True)

    def close(self) -> None:
        if self._closed:
            return
        if ray.is_initialized():  # else Ray ended already, and its actors with it
            self.kill()  # an ended run loop leaves an idle actor holding its bundle
            ray.wait([self._run], timeout=_CLOSE_WAIT_S)
            _ = self.pid, self.exitcode  # kept for the logs, from now on without Ray
        self._closed = True
        self._buffer.clear()
        self._next = None

    def __repr__(self) -> str:
        return f"RayWorker(id={self.worker_id}, pid={self.pid}, alive={self.is_alive()})"


class RayLauncher:
    """Starts each collector as a Ray actor in its own placement-group bundle.

    Args:
        config: placement and resources (:class:`RayLauncherConfig`).
        address: the cluster to join when Ray is not initialised yet (``"auto"``, or
            ``host:port`` of a head started with ``ray start --head``); ``None`` starts
            a local Ray.
        init_kwargs: more ``ray.init`` arguments for that case (e.g. ``num_cpus``).

    If Ray is initialised already (your own ``ray.init``), the launcher uses it and leaves
    it running; otherwise it calls ``ray.init`` at the first launch and ``ray.shutdown``
    in :meth:`shutdown`. The placement group holds ``spec.info.num_collectors`` bundles,
    one per collector id; a restarted collector takes its predecessor's bundle.
    """

    def __init__(self, config: RayLauncherConfig | None = None, *, address: str | None = None,
                 init_kwargs: Mapping[str, Any] | None = None) -> None:
        self.config = config or RayLauncherConfig()
        self.address = address
        self.init_kwargs = dict(init_kwargs or {})
        self.workers: dict[int, RayWorker] = {}
        """The current handle per collector id."""
        self.placement_group: PlacementGroup | None = None
        self._owns_ray = False

    # -- the Launcher protocol -----------------------------------------------------------
    def launch(self, spec: WorkerSpec, max_inflight: int) -> RayWorker:
        """Start the collector of ``spec`` as an actor in bundle ``spec.worker_id``.

        Raises:
            PlacementTimeout: the first launch could not reserve every bundle within
                ``config.placement_timeout``.
        """
        self._ensure_ray()
        pg = self._placement_group(spec.info.num_collectors)
        if not 0 <= spec.worker_id < len(pg.bundle_specs):
            raise CollectorError(f"collector id {spec.worker_id} has no bundle: the placement "
                                 f"group holds {len(pg.bundle_specs)}", spec.worker_id)
        actor = _RemoteCollector.options(
            num_cpus=self.config.num_cpus, num_gpus=self.config.num_gpus,
            max_concurrency=_ACTOR_THREADS, max_restarts=0, max_task_retries=0,
            runtime_env=dict(self.config.runtime_env) if self.config.runtime_env else None,
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                pg, placement_group_bundle_index=spec.worker_id),
        ).remote(spec, max_inflight)
        worker = RayWorker(spec.worker_id, actor)
        self.workers[spec.worker_id] = worker
        return worker

    def wait(self, workers: Sequence[WorkerHandle], timeout: float) -> list[WorkerHandle]:
        """One ``ray.wait`` on the workers' ``next_messages`` calls in flight."""
        handles: list[RayWorker] = []
        for w in workers:
            if not isinstance(w, RayWorker):
                raise TypeError(f"RayLauncher.wait got {w!r}, not a RayWorker")
            handles.append(w)
        ready: list[WorkerHandle] = [w for w in handles if w.has_local]
        if ready:
            return ready
        by_ref = {w.pending: w for w in handles}
        if not by_ref:
            return []
        done, _ = ray.wait(list(by_ref), num_returns=1, timeout=max(timeout, 0))
        if done and len(by_ref) > 1:
            done, _ = ray.wait(list(by_ref), num_returns=len(by_ref), timeout=0)
        return [by_ref[ref] for ref in done]

    def shutdown(self, timeout: float = 10.0) -> None:
        """Ask every collector to stop, wait up to ``timeout`` s for their run loops, kill
        the actors, remove the placement group, and end a Ray session this launcher began."""
        workers = list(self.workers.values())
        try:
            if ray.is_initialized():  # else nothing of it is left to stop
                for w in workers:
                    w.request_stop()
                if workers:
                    ray.wait([w.run_ref for w in workers], num_returns=len(workers),
                             timeout=max(timeout, 0))
                if self.placement_group is not None:
                    remove_placement_group(self.placement_group)
            for w in workers:
                w.close()
        finally:
            self.workers.clear()
            self.placement_group = None
            if self._owns_ray:
                self._owns_ray = False
                ray.shutdown()

    # -- group-level calls (NeMo-RL RayWorkerGroup style) -----------------------------------
    def run_all(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        """Call ``method`` (one of :data:`ACTOR_METHODS`) with the same arguments on every
        collector; the futures (``ObjectRef``), index ``i`` for collector ``i``."""
        return [self._method(w, method).remote(*args, **kwargs) for w in self._in_order()]

    def run_each(self, method: str, args: Sequence[Sequence[Any]]) -> list[Any]:
        """Call ``method`` on collector ``i`` with ``*args[i]``; the futures, in id order."""
        workers = self._in_order()
        if len(args) != len(workers):
            raise ValueError(f"run_each needs one argument tuple per collector "
                             f"({len(workers)}), got {len(args)}")
        return [self._method(w, method).remote(*a) for w, a in zip(workers, args, strict=True)]

    def get_all(self, refs: Sequence[Any], timeout: float) -> list[Any]:
        """The results of :meth:`run_all` / :meth:`run_each` futures, waiting up to
        ``timeout`` s for all of them.

        Raises:
            CollectorTimeout: some did not finish in time (their indices named).
            CollectorDied: a collector's actor died before answering.
            CollectorCrashed: the call raised in the collector (its traceback attached).
        """
        refs = list(refs)
        if not refs:
            return []
        _, pending = ray.wait(refs, num_returns=len(refs), timeout=max(timeout, 0))
        if pending:
            unfinished = set(pending)
            late = [i for i, ref in enumerate(refs) if ref in unfinished]
            raise CollectorTimeout(f"collector call(s) {late} not done within {timeout:.1f}s",
                                   late[0])
        out = []
        for i, ref in enumerate(refs):
            try:
                out.append(ray.get(ref))
            except RayActorError as exc:
                raise CollectorDied(f"collector {i} died before answering: {_one_line(exc)}",
                                    i) from exc
            except RayTaskError as exc:
                raise CollectorCrashed(f"collector {i}'s call raised {exc.cause!r}", i,
                                       traceback=str(exc)) from exc
        return out

    # -- internals ------------------------------------------------------------------------
    def _ensure_ray(self) -> None:
        if not ray.is_initialized():
            ray.init(address=self.address, **self.init_kwargs)
            self._owns_ray = True

    def _placement_group(self, bundles: int) -> PlacementGroup:
        if self.placement_group is not None:
            return self.placement_group
        config = self.config
        pg = placement_group([config.bundle] * bundles, strategy=config.strategy)
        if not pg.wait(timeout_seconds=config.placement_timeout):
            remove_placement_group(pg)
            raise PlacementTimeout(
                f"placement group of {bundles} bundle(s) {config.bundle} "
                f"({config.strategy}) not placed within {config.placement_timeout:.1f}s: "
                f"the cluster has {_resources(ray.cluster_resources())}, "
                f"{_resources(ray.available_resources())} available", None)
        log.info("placement group of %d bundle(s) %s (%s) ready", bundles, config.bundle,
                 config.strategy)
        self.placement_group = pg
        return pg

    def _in_order(self) -> list[RayWorker]:
        return [self.workers[i] for i in sorted(self.workers)]

    @staticmethod
    def _method(worker: RayWorker, method: str) -> Any:
        if method not in ACTOR_METHODS:
            raise ConfigError(f"method must be one of {ACTOR_METHODS}, got {method!r}")
        return getattr(worker.actor, method)


def _resources(resources: Mapping[str, float]) -> str:
    return ", ".join(f"{v:g} {k}" for k, v in sorted(resources.items())
                     if k in ("CPU", "GPU")) or "no CPU/GPU"
