"""The learner's half of :class:`~weight_sync.torchrl.WeightSyncTorchRLScheme`: its
sender, its connect while the workers start, and one update to all or some workers."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterable
from typing import Any

import torch

from weight_sync.config import ConnectionInfo, SenderConfig
from weight_sync.errors import CollectorFailed, ConfigError, WeightSyncError, WeightSyncTimeout
from weight_sync.learner.sender import WeightSender
from weight_sync.metrics import AckResult
from weight_sync.torchrl.ends import LearnerEnd

__all__ = ["SchemeLearner"]

log = logging.getLogger(__name__)

# While the learner connects, the worker processes are checked this often.
_WATCH_S = 0.05


class SchemeLearner:
    """The sender of one scheme on the learner, and what ``update_policy_weights_``
    does with it.

    Args:
        source: the learner's weights (``nn.Module``, TensorDict or ``state_dict``).
        num_workers: how many torchrl workers the collector runs (collector ids
            ``0..num_workers-1``).
        config: the sender's settings.
        context: the torchrl collector (its ``procs``/``pipes`` tell a dead worker; its
            ``policy_device`` maps devices to workers), or ``None``.
        bumped: per worker, a shared value its collector sets to the version its
            ``update_policy_weights_`` finished (``None``: not waited for).
    """

    def __init__(self, source: Any, num_workers: int, config: SenderConfig, *,
                 context: Any, bumped: list[Any] | None) -> None:
        self.num_workers = num_workers
        self.context = context
        self._bumped = bumped
        self.last_ack: AckResult | None = None
        """The :class:`AckResult` of the last update."""
        self.end = LearnerEnd(WeightSender(source, num_workers, config), range(num_workers))

    @property
    def infos(self) -> list[ConnectionInfo]:
        """What the workers connect with (one sender: one info)."""
        return [self.end.connection_info]

    @property
    def versions(self) -> dict[int, int]:
        """The version each worker holds once :meth:`send` returned: the newest sent
        to it."""
        return {w: self.end.sender.current_version(w) for w in range(self.num_workers)}

    def connect(self, timeout: float) -> None:
        """Connect the sender (in a thread) while watching the worker processes, so one
        that dies before connecting is reported at once instead of after ``timeout``.

        Raises:
            CollectorFailed: a worker process ended first (its index is
                ``collector_id``).
            WeightSyncError: the sender's connect failed.
        """
        errors: list[BaseException] = []

        def run() -> None:
            try:
                self.end.setup_connection_and_weights_on_sender(timeout)
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=run, daemon=True,
                                  name="weight-sync-torchrl-connect")
        thread.start()
        start = time.monotonic()
        while thread.is_alive():
            thread.join(_WATCH_S)
            if errors:
                break
            dead = self._dead_worker(range(self.num_workers))
            if dead is not None:
                worker, why = dead
                raise CollectorFailed(f"torchrl worker {worker} {why} before connecting "
                                      f"(after {time.monotonic() - start:.2f}s)", worker)
        if errors:
            raise errors[0]

    def send(self, weights: Any, worker_ids: Any, ack_timeout: float) -> None:
        """One update: see :meth:`WeightSyncTorchRLScheme.send`."""
        per_worker = (isinstance(weights, dict) and bool(weights)
                      and all(isinstance(k, int) and not isinstance(k, bool)
                              for k in weights))
        if per_worker:
            if worker_ids is not None:
                raise ConfigError("send(): give per-worker weights or worker_ids, not both")
            workers = self._worker_list(sorted(weights))
            for w in workers:  # each worker its own version
                self.end.send_weights_async(self._resolve_weights(weights[w]),
                                            collectors=[w])
        else:
            workers = self._worker_list(worker_ids)
            everyone = workers == list(range(self.num_workers))
            self.end.send_weights_async(self._resolve_weights(weights),
                                        collectors=None if everyone else workers)
        deadline = time.monotonic() + ack_timeout
        first: WeightSyncError | None = None
        result: Any
        try:
            result = self.end.wait_ack(max(deadline - time.monotonic(), 0.001))
        except WeightSyncError as exc:
            first = exc
            result = getattr(exc, "result", None)
        applied: dict[int, int] = {}  # worker -> version it acked
        if isinstance(result, AckResult):
            self.last_ack = result
            applied = {w: self.end.sender.current_version(w) for w in result.acked
                       if w in workers}
        try:
            self._wait_bumped(applied, deadline)
        except WeightSyncError as exc:
            first = first or exc
        if first is not None:
            raise first

    def close(self) -> None:
        try:
            self.end.close()
        except Exception as exc:
            log.warning("closing the sender of the torchrl workers: %r", exc)

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


def _describe_exit(code: int | None) -> str:
    if code is not None and code < 0:
        return f"killed by signal {-code}"
    return f"exit code {code}"
