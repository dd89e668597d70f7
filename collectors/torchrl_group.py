"""The demo's collector group over torchrl's own ``MultiSyncCollector``.

:class:`TorchRLGroup` offers what ``weight-sync demo`` uses of a
:class:`~weight_sync.collectors.group.CollectorGroup` (``next_batch``, ``batch_records``,
``update_weights``, ``stats``, ``version``, ``summary``), but the processes, the
rollouts and the batches are torchrl's: a ``MultiSyncCollector`` whose weights travel
through :class:`~weight_sync.torchrl.WeightSyncTorchRLScheme`.

Example::

    policy = make_policy()
    with TorchRLGroup(policy, make_env, num_collectors=2, frames_per_batch=256) as group:
        for _ in range(100):
            batch = torch.stack([group.next_batch() for _ in range(2)])   # [2, 256]
            train(policy, batch)
            group.update_weights()      # collector.update_policy_weights_()
"""

from __future__ import annotations

import functools
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from tensordict import TensorDictBase
from torchrl.collectors import MultiSyncCollector
from weight_sync.collectors.group import BatchRecord, summarize

from weight_sync import SyncStats
from weight_sync.torchrl import WeightSyncTorchRLScheme

__all__ = ["TorchRLGroup"]


class TorchRLGroup:
    """``num_collectors`` torchrl workers kept current by weight-sync.

    Args:
        policy: the learner's policy (read at every update; sent to the workers without
            its weights, which the scheme's initial sync provides).
        env_factory: module-level ``seed -> env``; worker ``i`` gets ``seed + 1000 * i``.
        num_collectors: torchrl worker processes.
        frames_per_batch: steps per worker and batch.
        seed: base seed of the envs.
        transport: the weight-sync transport (``"auto"``, the default, or a name:
            ``"distributed"``, ``"shm"``...).
        sync_timeout: bound on one ``update_weights``, seconds.
    """

    def __init__(self, policy: Any, env_factory: Callable[[int], Any], *,
                 num_collectors: int = 2, frames_per_batch: int = 256, seed: int = 0,
                 transport: str = "auto", sync_timeout: float = 30.0) -> None:
        self.num_collectors = num_collectors
        self.scheme = WeightSyncTorchRLScheme(transport=transport, ack_timeout=sync_timeout)
        self.collector = MultiSyncCollector(
            [functools.partial(env_factory, seed + 1000 * i) for i in range(num_collectors)],
            policy=policy, frames_per_batch=frames_per_batch * num_collectors,
            total_frames=-1, track_policy_version=True,
            weight_sync_schemes={"policy": self.scheme})
        self._batches = iter(self.collector)
        self._rows: deque[TensorDictBase] = deque()
        self.batch_records: deque[BatchRecord] = deque(maxlen=100_000)
        self._seq = 0
        self._closed = False

    def __enter__(self) -> TorchRLGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Shut the collector's workers down, then the scheme's senders; idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self.collector.shutdown(raise_on_error=False)
        finally:
            self.scheme.shutdown()

    @property
    def version(self) -> int:
        return self.scheme.versions[0]

    @property
    def stats(self) -> SyncStats:
        """The sender's per-round records (the scheme has one sender for all workers)."""
        sender = self.scheme.sender
        assert sender is not None, "the policy has weights: the scheme built a sender"
        return sender.stats

    def next_batch(self) -> TensorDictBase:
        """One worker's rows (``[frames_per_batch]``, time last); the collector's next
        ``[num_collectors, frames_per_batch]`` batch every ``num_collectors`` calls."""
        if not self._rows:
            start = time.perf_counter()
            batch = next(self._batches)
            collect_s = (time.perf_counter() - start) / self.num_collectors
            learner = self.version
            for worker in range(self.num_collectors):
                row = batch[worker]
                versions = row.get(("next", "policy_version"))
                low, high = int(versions.min()), int(versions.max())
                self.batch_records.append(BatchRecord(
                    worker_id=worker, seq=self._seq, frames=row.numel(), version_min=low,
                    version_max=high, learner_version=learner, staleness=learner - low,
                    collect_s=collect_s, transit_s=0.0))
                self._rows.append(row)
            self._seq += 1
        return self._rows.popleft()

    def update_weights(self, timeout: float | None = None) -> None:
        """``collector.update_policy_weights_()``: every worker holds the policy's
        current weights when it returns (bounded by ``sync_timeout``)."""
        self.collector.update_policy_weights_()

    def summary(self) -> dict[str, float]:
        """As :meth:`CollectorGroup.summary`: sync figures, batches, frames, staleness."""
        return summarize(self.stats, self.batch_records)
