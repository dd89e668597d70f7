"""The learner's handle on N collector processes: :class:`CollectorGroup`.

Example::

    policy = make_policy()
    with CollectorGroup(policy, make_env, make_policy, collect, num_collectors=2) as group:
        for i, batch in enumerate(group):      # TensorDicts tagged "policy_version"
            train_on(batch)                    # updates `policy` in place
            group.update_weights(timeout=30)   # send_weights_async + wait_ack
            if i == 100:
                break
    # every collector process has ended here, also after an exception or Ctrl-C

A collector that raises surfaces here as :class:`~weight_sync.collectors.errors.CollectorCrashed`
with its traceback; one that dies (killed, exit) as
:class:`~weight_sync.collectors.errors.CollectorDied`. Both are noticed at once: the group waits on
all collectors together through its launcher (local processes: their pipes and process
sentinels in one call; Ray actors: one ``ray.wait``), never on one blind queue.

With ``max_restarts=k`` the group instead restarts a failed collector (same id, up to
``k`` restarts in all): the new process rejoins the weight stream, is caught up with
the newest weights, and its batches carry its own ``policy_version``; the others never
stop. Each restart is logged and kept in :attr:`CollectorGroup.restarts`.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from tensordict import TensorDictBase
from weight_sync.collectors.errors import CollectorDied, CollectorError, CollectorTimeout
from weight_sync.collectors.inbox import Inbox
from weight_sync.collectors.launcher import Launcher, LocalLauncher, WorkerHandle
from weight_sync.collectors.worker import WorkerSpec

from weight_sync import CollectorFailed, SenderConfig, SyncStats, WeightSender, WeightSyncTimeout
from weight_sync.config import check_count
from weight_sync.errors import ConfigError
from weight_sync.metrics import AckResult

__all__ = ["BatchRecord", "CollectorGroup", "RestartRecord", "summarize"]


def summarize(stats: SyncStats, batches: Iterable[BatchRecord]) -> dict[str, float]:
    """A run's summary: the sync figures plus batches, frames and staleness."""
    out = dict(stats.summary())
    records = list(batches)
    out["batches"] = float(len(records))
    out["frames"] = float(sum(r.frames for r in records))
    stale = [r.staleness for r in records]
    out["staleness_mean"] = sum(stale) / len(stale) if stale else float("nan")
    out["staleness_max"] = float(max(stale)) if stale else float("nan")
    return out

log = logging.getLogger(__name__)

# update_weights waits for acks in slices this long, watching the collectors between.
_ACK_SLICE_S = 0.25


@dataclass(frozen=True)
class BatchRecord:
    """What the group knows about one batch it handed out."""

    worker_id: int
    seq: int
    frames: int
    version_min: int
    version_max: int
    learner_version: int
    staleness: int
    """``learner_version - version_min``: updates the oldest step of the batch missed."""
    collect_s: float
    transit_s: float


@dataclass(frozen=True)
class RestartRecord:
    """One collector failure answered by a restart."""

    worker_id: int
    reason: str
    learner_version: int
    """The learner's version when it restarted (the new process catches up to it)."""
    at: float
    """``time.time()`` of the restart."""


class CollectorGroup:
    """Starts ``num_collectors`` collectors, iterates their batches, keeps them current.

    Args:
        policy: the learner's policy (its tensors are read at every weight update).
        env_factory: module-level ``seed -> env`` run in each collector.
        policy_factory: module-level function building a policy like ``policy``.
        num_collectors: how many collector processes.
        frames_per_batch: steps per batch.
        seed: base seed (collector ``i`` seeds its env with ``seed + 1000 * i``).
        max_inflight: batches a collector may have produced and the learner not taken.
        poll_every_step: collectors poll for weights before every step (else per batch).
        record_checksum: collectors tag steps with a checksum of their weights.
        launcher: how to start collectors (:class:`LocalLauncher` by default).
        sender_config: settings of the :class:`~weight_sync.WeightSender`.
        connect_timeout: bound on start-up (processes up, rendezvous, initial sync).
        batch_timeout: bound on waiting for the next batch when iterating.
        shutdown_timeout: how long :meth:`close` lets collectors stop before killing them.
        collect_fn: module-level rollout ``(env, policy, frames, state) -> (batch, state)``
            the collectors run (e.g. the CartPole task's ``weight_sync.collectors.task.collect``);
            passed on to every :class:`WorkerSpec`.
        max_restarts: how many collector failures (in all) are answered by restarting
            that collector instead of raising; 0 fails fast.
        sender: a sender built elsewhere for exactly ``num_collectors`` collectors (e.g.
            a rank's ``DataParallelSender.sender``) instead of one built from
            ``sender_config``; the group connects and closes it.
    """

    def __init__(self, policy: Any, env_factory: Callable[[int], Any],
                 policy_factory: Callable[[], Any], collect_fn: Callable[..., Any], *,
                 num_collectors: int = 2,
                 frames_per_batch: int = 256, seed: int = 0, max_inflight: int = 2,
                 poll_every_step: bool = True, record_checksum: bool = False,
                 launcher: Launcher | None = None, sender_config: SenderConfig | None = None,
                 connect_timeout: float = 60.0, batch_timeout: float = 60.0,
                 shutdown_timeout: float = 10.0, max_restarts: int = 0,
                 sender: WeightSender | None = None) -> None:
        check_count("max_inflight", max_inflight, 1)
        check_count("max_restarts", max_restarts, 0)
        self.policy = policy
        self.num_collectors = num_collectors
        self.launcher: Launcher = launcher or LocalLauncher()
        self.connect_timeout = connect_timeout
        self.batch_timeout = batch_timeout
        self.shutdown_timeout = shutdown_timeout
        self.max_inflight = max_inflight
        if sender is not None and sender.num_collectors != num_collectors:
            raise ConfigError(f"the sender serves {sender.num_collectors} collectors, "
                              f"the group has {num_collectors}")
        self.sender = sender or WeightSender(policy, num_collectors, sender_config)
        self._spec: dict[str, Any] = dict(
            env_factory=env_factory, policy_factory=policy_factory,
            frames_per_batch=frames_per_batch, seed=seed, poll_every_step=poll_every_step,
            record_checksum=record_checksum, connect_timeout=connect_timeout,
            collect_fn=collect_fn)
        self.workers: list[WorkerHandle] = []
        self.batch_records: deque[BatchRecord] = deque(maxlen=100_000)
        self.max_restarts = max_restarts
        self.restarts: list[RestartRecord] = []
        """Every restart so far, oldest first."""
        self._inbox = Inbox(self.workers, self.launcher.wait, recover=self._restart)
        self._started = False
        self._running = False  # started and not closed: failures may be restarted
        self._closed = False

    # -- lifecycle -------------------------------------------------------------------
    def start(self) -> CollectorGroup:
        """Launch the collectors and connect them (initial sync); bounded by
        ``connect_timeout``. On failure everything started is shut down."""
        if self._started:
            return self
        self._started = True
        try:
            info = self.sender.connection_info
            for i in range(self.num_collectors):
                spec = WorkerSpec(worker_id=i, info=info, **self._spec)
                self.workers.append(self.launcher.launch(spec, self.max_inflight))
            deadline = time.monotonic() + self.connect_timeout
            while len(self._inbox.said_hello) < self.num_collectors:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    missing = sorted(set(range(self.num_collectors)) - self._inbox.said_hello)
                    raise CollectorTimeout(f"collector(s) {missing} not up after "
                                           f"{self.connect_timeout:.1f}s", None)
                self._inbox.pump(remaining)
            try:
                self.sender.connect(max(deadline - time.monotonic(), 0.001))
            except WeightSyncTimeout:
                self._inbox.pump(0.5)  # a collector that died meanwhile is the better error
                raise
            log.info("collector group up: %d collector(s), pids %s", self.num_collectors,
                     self.pids)
            self._running = True
        except BaseException:
            self.close()
            raise
        return self

    def __enter__(self) -> CollectorGroup:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop every collector: stop signal, close the weight stream, join with a
        timeout, then terminate and kill. Idempotent; leaves no process behind."""
        if self._closed:
            return
        self._closed = True
        self._running = False
        try:
            for w in self.workers:
                w.request_stop()
            self.sender.close()  # collectors polling for weights see ClosedError
            deadline = time.monotonic() + self.shutdown_timeout
            while any(w.is_alive() for w in self.workers) and time.monotonic() < deadline:
                self._inbox.drain_quietly(min(0.1, max(deadline - time.monotonic(), 0)))
        finally:
            for w in self.workers:
                if w.is_alive():
                    log.warning("collector %d did not stop in %.1fs; terminating",
                                w.worker_id, self.shutdown_timeout)
                    w.terminate()
                    w.join(2.0)
                if w.is_alive():
                    w.kill()
                    w.join(2.0)
                w.join(0.1)
                w.close()
            self._inbox.ready.clear()
            self.launcher.shutdown(self.shutdown_timeout)
        log.info("collector group closed: exit codes %s",
                 {w.worker_id: w.exitcode for w in self.workers})

    # -- properties --------------------------------------------------------------------
    @property
    def version(self) -> int:
        """The learner's newest weight version."""
        return self.sender.version

    @property
    def stats(self) -> SyncStats:
        """Per-sync records of the sender (bytes, latency, GB/s, versions acked)."""
        return self.sender.stats

    @property
    def pids(self) -> list[int | None]:
        return [w.pid for w in self.workers]

    def summary(self) -> dict[str, float]:
        """Sync figures (``sender.stats.summary()``) plus batches, frames and staleness."""
        return summarize(self.stats, self.batch_records)

    # -- batches -------------------------------------------------------------------------
    def __iter__(self) -> Iterator[TensorDictBase]:
        return self

    def __next__(self) -> TensorDictBase:
        return self.next_batch(self.batch_timeout)

    def next_batch(self, timeout: float | None = None) -> TensorDictBase:
        """The next batch from any collector, waiting up to ``timeout`` s.

        Raises:
            CollectorCrashed / CollectorDied: a collector failed (named, with traceback).
            CollectorTimeout: no batch arrived in time.
        """
        self._check_running("next_batch")
        timeout = self.batch_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        self._inbox.pump(0)
        while not self._inbox.ready:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise CollectorTimeout(
                    f"no batch from collectors {[w.worker_id for w in self.workers]} within "
                    f"{timeout:.1f}s", None)
            self._inbox.pump(remaining)
        header, batch, handle = self._inbox.ready.popleft()
        wid = int(header["worker_id"])
        if handle is self.workers[wid]:  # not a batch of a process since restarted
            handle.release_credit()
        record = BatchRecord(
            worker_id=wid, seq=int(header["seq"]), frames=int(batch.numel()),
            version_min=int(header["version_min"]), version_max=int(header["version_max"]),
            learner_version=self.version, staleness=self.version - int(header["version_min"]),
            collect_s=float(header["collect_s"]),
            transit_s=max(time.time() - float(header["sent_at"]), 0.0))
        self.batch_records.append(record)
        return batch

    # -- weights ---------------------------------------------------------------------------
    def update_weights(self, timeout: float = 30.0) -> AckResult:
        """Send the policy's current weights as a new version and wait for every ack.

        Returns:
            The sender's :class:`~weight_sync.metrics.AckResult`. When a collector
            failed and was restarted (``max_restarts``), its ``failed`` names it and
            the others' acks are in ``acked``.

        Raises:
            CollectorCrashed / CollectorDied: a collector failed meanwhile (named) and
                no restart was left.
            WeightSyncTimeout: not every collector acked within ``timeout``.
        """
        self._check_running("update_weights")
        self._inbox.pump(0)
        self.sender.send_weights_async()
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                return self.sender.wait_ack(min(_ACK_SLICE_S, max(remaining, 0.001)))
            except CollectorFailed as exc:
                cid = exc.collector_id
                failed = self.workers[cid]
                if exc.pid is not None and exc.pid != failed.pid:
                    return exc.result  # type: ignore[return-value]  # a replaced process
                # Wait for the collector's own report (traceback, exit code) or the end
                # of its process, whichever comes first: it is the better error, and it
                # may restart the collector. A collector closes its receiver before it
                # reports, so the learner may see the link break first.
                until = time.monotonic() + self.shutdown_timeout
                while (time.monotonic() < until and self.workers[cid] is failed
                       and cid not in self._inbox.ended):
                    self._inbox.pump(until - time.monotonic())
                if self.workers[cid] is not failed:  # restarted: it rejoins by itself
                    return exc.result  # type: ignore[return-value]
                error = CollectorDied(f"collector {cid}: its weight link broke: {exc}", cid)
                if self._restart(error):
                    return exc.result  # type: ignore[return-value]
                raise self._inbox.fail(error) from exc
            except WeightSyncTimeout as exc:
                if remaining <= _ACK_SLICE_S:
                    raise WeightSyncTimeout(f"version {self.version} not acked within "
                                            f"{timeout:.1f}s: {exc}", exc.result) from exc
                self._inbox.pump(0)  # keep channels drained; surfaces a crashed collector

    # -- internals -------------------------------------------------------------------------
    def _restart(self, error: CollectorError) -> bool:
        """Answer a collector's failure with a new process of the same id, if allowed."""
        wid = error.worker_id
        if not self._running or wid is None or len(self.restarts) >= self.max_restarts:
            return False
        old = self.workers[wid]
        old.request_stop()
        if old.is_alive():  # e.g. frozen: its link was failed, its process lingers
            old.kill()
        old.join(5.0)
        old.close()
        # A new seed: the new process must not replay its predecessor's episodes.
        nth = 1 + sum(r.worker_id == wid for r in self.restarts)
        spec = WorkerSpec(worker_id=wid, info=self.sender.connection_info,
                          **{**self._spec, "seed": self._spec["seed"] + 100_003 * nth})
        self.workers[wid] = self.launcher.launch(spec, self.max_inflight)
        self._inbox.ended.discard(wid)
        self._inbox.said_hello.discard(wid)
        reason = str(error).splitlines()[0]
        self.restarts.append(RestartRecord(wid, reason, self.version, time.time()))
        log.warning("collector %d failed (%s); launched again: %r (%d of %d restarts)",
                    wid, reason, self.workers[wid], len(self.restarts), self.max_restarts)
        return True

    def _check_running(self, what: str) -> None:
        if self._inbox.failure is not None:
            raise self._inbox.failure
        if self._closed or not self._started:
            raise CollectorError(f"CollectorGroup.{what}() "
                                 + ("after close()" if self._closed else "before start()"),
                                 None)
