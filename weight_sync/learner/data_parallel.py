"""Weight sync for a learner that is itself data-parallel (DDP, or any replicated setup).

Every rank runs the same training loop and holds the same weights after each
gradient all-reduce, so every rank can serve collectors. :class:`DataParallelSender`
splits the collectors between the ranks, collector ``i`` being served by rank
``i % world_size`` as its local collector ``i // world_size``: the learner's fan-out
(packing once per rank, sending to N / world_size collectors) is spread over the ranks,
their cores and their network links. With ``shard=False`` one rank serves them all
and the others' calls return at once.

Example (every rank)::

    dist.init_process_group("gloo")                     # or nccl; torchrun sets the env
    sender = DataParallelSender(policy, num_collectors=8)
    launch_collectors([sender.assignment(i) for i in range(8)])   # (info, id) each
    sender.connect(timeout=120)
    for step in range(steps):
        train_step()                                    # DDP all-reduce: weights agree
        sender.send_weights_async()
        sender.wait_ack(timeout=30)

Collector ``i`` then runs ``WeightReceiver(policy, info, local_id)`` with its
assignment. The connection infos are exchanged with ``all_gather_object`` on the
default process group, so build the sender on every rank, in the same order.
"""

from __future__ import annotations

import os
from typing import Any

import torch.distributed as dist

from weight_sync.config import ConnectionInfo
from weight_sync.errors import ConfigError
from weight_sync.learner.sender import WeightSender
from weight_sync.metrics import AckResult

__all__ = ["DataParallelSender", "rank_and_world_size"]


def rank_and_world_size(rank: int | None = None,
                        world_size: int | None = None) -> tuple[int, int]:
    """This process's rank and the world size: the arguments, else the default
    process group, else torchrun's ``RANK``/``WORLD_SIZE``, else ``(0, 1)``."""
    if rank is None or world_size is None:
        if dist.is_available() and dist.is_initialized():
            rank = dist.get_rank() if rank is None else rank
            world_size = dist.get_world_size() if world_size is None else world_size
        else:
            rank = int(os.environ.get("RANK", "0")) if rank is None else rank
            world_size = (int(os.environ.get("WORLD_SIZE", "1"))
                          if world_size is None else world_size)
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank must be in [0, world_size={world_size}), got {rank!r}")
    return rank, world_size


class DataParallelSender:
    """The weight sender of one rank of a data-parallel learner.

    Args:
        policy: this rank's replica of the policy.
        num_collectors: collectors in all (ids ``0..num_collectors-1``).
        shard: split the collectors between the ranks (default); if False, rank
            ``sender_rank`` serves them all and the other ranks' calls do nothing.
        sender_rank: the serving rank when ``shard`` is False.
        rank: this rank; defaults to the process group's (see
            :func:`rank_and_world_size`).
        world_size: the number of ranks; defaults to the process group's.
        sender_options: passed to each rank's :class:`WeightSender` (``host``,
            ``port``, ``timeout``, ...). A fixed ``port`` is offset by the rank.

    Raises:
        ConfigError: fewer collectors than serving ranks, or a bad rank.
    """

    def __init__(self, policy: Any, num_collectors: int, *, shard: bool = True,
                 sender_rank: int = 0, rank: int | None = None, world_size: int | None = None,
                 **sender_options: Any) -> None:
        self.rank, self.world_size = rank_and_world_size(rank, world_size)
        if not 0 <= sender_rank < self.world_size:
            raise ConfigError(f"sender_rank must be in [0, {self.world_size}), "
                              f"got {sender_rank!r}")
        self.num_collectors = num_collectors
        self.servers = self.world_size if shard else 1
        """How many ranks serve collectors."""
        if not isinstance(num_collectors, int) or num_collectors < self.servers:
            raise ConfigError(f"num_collectors must be an int >= the {self.servers} serving "
                              f"rank(s), got {num_collectors!r}")
        self._first_server = 0 if shard else sender_rank
        self.sender: WeightSender | None = None
        """This rank's sender; ``None`` on a rank that serves nobody."""
        served = self.served()
        if served:
            if sender_options.get("port"):
                sender_options["port"] = int(sender_options["port"]) + self.rank
            self.sender = WeightSender(policy, len(served), **sender_options)
        self.version = 0
        self.infos = self._gather_infos()
        """Each serving rank's connection info, in serving order."""

    def served(self, rank: int | None = None) -> list[int]:
        """The collector ids (global, ascending) that ``rank`` (default: this rank)
        serves; collector ``served()[j]`` has local id ``j`` there."""
        rank = self.rank if rank is None else rank
        if self.servers == 1:
            return list(range(self.num_collectors)) if rank == self._first_server else []
        return list(range(rank, self.num_collectors, self.world_size))

    def _gather_infos(self) -> list[ConnectionInfo]:
        mine = self.sender.connection_info if self.sender is not None else None
        if self.world_size == 1:
            gathered: list[Any] = [mine]
        else:
            if not (dist.is_available() and dist.is_initialized()):
                raise ConfigError("a DataParallelSender over several ranks needs the "
                                  "default process group (torch.distributed.init_process_group)")
            gathered = [None] * self.world_size
            dist.all_gather_object(gathered, mine)
        return [info for info in gathered if info is not None]

    def assignment(self, collector: int) -> tuple[ConnectionInfo, int]:
        """What collector ``collector`` needs: the serving rank's connection info and
        its id there (pass both to :class:`~weight_sync.WeightReceiver`)."""
        if not isinstance(collector, int) or not 0 <= collector < self.num_collectors:
            raise ConfigError(f"collector must be in [0, {self.num_collectors}), "
                              f"got {collector!r}")
        if self.servers == 1:
            return self.infos[0], collector
        return self.infos[collector % self.world_size], collector // self.world_size

    def connect(self, timeout: float = 60.0) -> None:
        """Wait for this rank's collectors and sync them (nothing on a rank that
        serves nobody)."""
        if self.sender is not None:
            self.sender.connect(timeout)

    def send_weights_async(self, weights: Any = None) -> int:
        """Send this rank's (replicated) weights to its collectors; the new version,
        the same on every rank."""
        self.version += 1
        if self.sender is not None:
            version = self.sender.send_weights_async(weights)
            assert version == self.version
        return self.version

    def wait_ack(self, timeout: float = 60.0) -> AckResult | None:
        """Wait for this rank's collectors (``None`` on a rank that serves nobody).

        Raises:
            CollectorFailed, WeightSyncTimeout: as :meth:`WeightSender.wait_ack`, with
                this rank's local collector ids.
        """
        return self.sender.wait_ack(timeout) if self.sender is not None else None

    def close(self) -> None:
        if self.sender is not None:
            self.sender.close()

    def __enter__(self) -> DataParallelSender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
