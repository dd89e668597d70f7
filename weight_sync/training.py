"""The rank-aware helper of a learner that is itself data-parallel.

:class:`DistributedHelper` joins (or adopts) the default torch.distributed process
group from the variables torchrun and torchrunx set (``RANK``, ``LOCAL_RANK``,
``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) and gives the training loop the
method set of metta's helper (``is_distributed``, ``is_master``, ``get_rank``,
``get_world_size``, ``scale_batch_config``, ``wrap_policy``, ``synchronize``,
``broadcast_from_master``, ``should_log`` / ``should_checkpoint`` /
``should_evaluate``, ``all_gather``, ``all_reduce``, ``cleanup``). Without those
variables (``WORLD_SIZE`` unset or 1) it is a single process and every collective is
a no-op that returns its input.

mjlab's conventions are built in: :meth:`~DistributedHelper.seed` is ``base + rank``,
only rank 0 writes files and logs (:meth:`~DistributedHelper.is_writer`), and
:meth:`~DistributedHelper.reduce_gradients` averages the gradients with one
all-reduce of one flat tensor per step (rsl_rl's ``reduce_parameters``).
Its companion :class:`DataParallelSender` (exported here too) is the one way to serve
collectors from such a learner: each rank serves its share of them.

Example (every rank; ``torchrun --nproc-per-node 2 train.py``)::

    helper = DistributedHelper()                  # gloo on CPU, nccl on CUDA
    torch.manual_seed(cfg.seed)                   # the same initial weights...
    policy = make_policy()
    helper.broadcast_parameters(policy)           # ...made sure of
    torch.manual_seed(helper.seed(cfg.seed))      # then each rank its own samples
    cfg = helper.scale_batch_config(cfg, "batch_size")   # keep the global batch
    sender = DataParallelSender(policy, num_collectors=8)
    launch(sender.served())                       # this rank's collectors
    sender.connect(timeout=120)
    for step in range(steps):
        loss(policy, batch).backward()
        helper.reduce_gradients(policy.parameters())   # the mean over ranks
        optimizer.step()                          # every rank: the same weights
        sender.send_weights_async()
        sender.wait_ack(timeout=30)
    helper.cleanup()
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterable, Mapping
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from weight_sync.errors import ConfigError, ConnectionFailed, WeightSyncTimeout
from weight_sync.learner.data_parallel import DataParallelSender, rank_and_world_size
from weight_sync.wire.layout import named_leaves

__all__ = ["DataParallelSender", "DistributedHelper", "slurm_environ"]

log = logging.getLogger(__name__)

_C = TypeVar("_C")

#: What ``init_method="env://"`` reads, besides ``WORLD_SIZE``.
_RENDEZVOUS_VARS = ("RANK", "MASTER_ADDR", "MASTER_PORT")
#: torchrun's name <- the variable ``srun`` sets for each task.
_FROM_SLURM = {"RANK": "SLURM_PROCID", "WORLD_SIZE": "SLURM_NTASKS",
               "LOCAL_RANK": "SLURM_LOCALID"}


def slurm_environ(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """``environ`` (default ``os.environ``) with torchrun's ``RANK``, ``WORLD_SIZE`` and
    ``LOCAL_RANK`` taken from ``srun``'s ``SLURM_PROCID``, ``SLURM_NTASKS`` and
    ``SLURM_LOCALID`` where they are not set; pass it as ``DistributedHelper(environ=...)``
    in a script that ``srun`` starts once per rank. ``srun`` sets no rendezvous address:
    export ``MASTER_ADDR`` (the first host of the job) and ``MASTER_PORT`` yourself.
    Opt-in, because a single process inside a multi-task allocation sees the same
    variables."""
    env = dict(os.environ if environ is None else environ)
    for name, slurm in _FROM_SLURM.items():
        if not env.get(name) and env.get(slurm):
            env[name] = env[slurm]
    return env


class DistributedHelper:
    """One rank of a data-parallel learner (or a single process).

    Args:
        backend: ``"gloo"`` or ``"nccl"``; by default nccl when ``device`` is CUDA,
            gloo otherwise.
        device: this rank's device; by default ``cuda:LOCAL_RANK`` when CUDA is
            available, else the CPU.
        timeout: bound in seconds on the rendezvous and on every collective.
        environ: where to read the launcher's variables (default ``os.environ``).

    A process group that already exists (torchrunx starts one before calling the
    function; a caller may too) is adopted, not joined again, and :meth:`cleanup`
    leaves it alone.

    Raises:
        ConfigError: ``WORLD_SIZE`` > 1 without ``RANK``/``MASTER_ADDR``/``MASTER_PORT``,
            or a variable that is not a number.
        ConnectionFailed: the rendezvous address did not answer within ``timeout``.
        WeightSyncTimeout: not every rank joined within ``timeout``.
    """

    def __init__(self, backend: str | None = None, *, device: torch.device | str | None = None,
                 timeout: float = 60.0, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.local_rank = _int_var(env, "LOCAL_RANK", 0)
        """This process's index on its host (torchrun's ``LOCAL_RANK``)."""
        if device is None:
            device = f"cuda:{self.local_rank}" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        """This rank's device (:meth:`wrap_policy` places DDP on it)."""
        self.timeout = timeout
        self._owns_group = False
        if dist.is_available() and dist.is_initialized():
            log.info("adopting the existing process group (rank %d of %d)",
                     dist.get_rank(), dist.get_world_size())
        elif _int_var(env, "WORLD_SIZE", 1) > 1:
            self._join(backend or ("nccl" if self.device.type == "cuda" else "gloo"), env)
        # A single process reads no variable: a stray RANK must not make it rank 1 of 1.
        grouped = dist.is_available() and dist.is_initialized()
        self._rank, self._world_size = rank_and_world_size(*(() if grouped else (0, 1)))
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)

    def _join(self, backend: str, env: Mapping[str, str]) -> None:
        missing = [name for name in _RENDEZVOUS_VARS if not env.get(name)]
        if missing:
            raise ConfigError(f"WORLD_SIZE={env['WORLD_SIZE']!r} but {missing} not set: start "
                              "the ranks with torchrun/torchrunx, or set the variables")
        rank, world = _int_var(env, "RANK", 0), _int_var(env, "WORLD_SIZE", 1)
        where = f"{env['MASTER_ADDR']}:{env['MASTER_PORT']}"
        init = f"tcp://{where}"
        try:
            dist.init_process_group(backend, init_method=init, rank=rank, world_size=world,
                                    timeout=timedelta(seconds=self.timeout))
        except dist.DistNetworkError as exc:
            raise ConnectionFailed(f"rank {rank}: the rendezvous at {where} did not answer "
                                   f"within {self.timeout:.1f}s: {exc}") from exc
        except dist.DistError as exc:
            raise WeightSyncTimeout(f"rank {rank}: not all {world} ranks joined the "
                                    f"rendezvous at {where} within {self.timeout:.1f}s: "
                                    f"{exc}") from exc
        self._owns_group = True
        log.info("joined the %s process group at %s as rank %d of %d", backend, where, rank,
                 world)

    # -- who am I ---------------------------------------------------------------------
    @property
    def is_distributed(self) -> bool:
        """More than one rank (a process group is in use)."""
        return self._world_size > 1

    def is_master(self) -> bool:
        """Rank 0."""
        return self._rank == 0

    def get_rank(self) -> int:
        return self._rank

    def get_world_size(self) -> int:
        return self._world_size

    def seed(self, base: int) -> int:
        """This rank's seed: ``base + rank`` (initialise shared weights with ``base``
        first, or :meth:`broadcast_parameters`)."""
        return base + self._rank

    def is_writer(self) -> bool:
        """Whether this rank writes files and logs: rank 0 only, a single writer."""
        return self.is_master()

    def should_log(self) -> bool:
        return self.is_writer()

    def should_checkpoint(self) -> bool:
        return self.is_writer()

    def should_evaluate(self) -> bool:
        return self.is_writer()

    # -- configuration ---------------------------------------------------------------
    def scale_batch_config(self, config: _C, *fields: str) -> _C:
        """A copy of the dataclass ``config`` with each of ``fields`` (default
        ``batch_size``) divided by the world size, so the global batch stays the same.

        Raises:
            ConfigError: ``config`` is not a dataclass, lacks a field, or a field is not
                a positive int divisible by the world size (the value is quoted).
        """
        if not dataclasses.is_dataclass(config) or isinstance(config, type):
            raise ConfigError(f"scale_batch_config needs a dataclass instance, got {config!r}")
        scaled: dict[str, int] = {}
        for name in fields or ("batch_size",):
            value = getattr(config, name, None)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{type(config).__name__}.{name} must be a positive int "
                                  f"to scale, got {value!r}")
            if value % self._world_size:
                raise ConfigError(f"{type(config).__name__}.{name}={value!r} is not divisible "
                                  f"by the world size {self._world_size}")
            scaled[name] = value // self._world_size
        return dataclasses.replace(config, **scaled)

    def wrap_policy(self, policy: nn.Module, **ddp_options: Any) -> nn.Module:
        """``DistributedDataParallel(policy)`` on this rank's device when distributed
        (gradients averaged by DDP's own hooks), else ``policy`` itself."""
        if not self.is_distributed:
            return policy
        if self.device.type == "cuda":
            ddp_options.setdefault("device_ids", [self.device])
        return nn.parallel.DistributedDataParallel(policy, **ddp_options)

    # -- collectives -------------------------------------------------------------------
    def synchronize(self) -> None:
        """Wait until every rank got here (a barrier; bounded by the group's timeout)."""
        if self.is_distributed:
            dist.barrier()

    def broadcast_from_master(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (pickled; for small objects)."""
        if not self.is_distributed:
            return obj
        objects = [obj if self.is_master() else None]
        dist.broadcast_object_list(objects, src=0)
        return objects[0]

    def broadcast_parameters(self, weights: Any) -> None:
        """Overwrite ``weights`` (a module, TensorDict or state dict) in place with rank
        0's, so that every rank starts from the same weights."""
        if not self.is_distributed:
            return
        with torch.no_grad():
            for tensor in named_leaves(weights).values():
                dist.broadcast(tensor, src=0)

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's ``tensor`` (same shape everywhere), in rank order."""
        if not self.is_distributed:
            return [tensor]
        gathered = [torch.empty_like(tensor) for _ in range(self._world_size)]
        dist.all_gather(gathered, tensor)
        return gathered

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (pickled; any size), in rank order."""
        if not self.is_distributed:
            return [obj]
        gathered: list[Any] = [None] * self._world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def all_reduce(self, tensor: torch.Tensor,
                   op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> torch.Tensor:
        """Reduce ``tensor`` over the ranks in place (SUM by default); returns it."""
        if self.is_distributed:
            dist.all_reduce(tensor, op=op)
        return tensor

    def reduce_gradients(self, parameters: Iterable[torch.Tensor]) -> None:
        """Average the gradients of ``parameters`` over the ranks: flatten them into one
        tensor, one all-reduce, divide by the world size, copy back (one tensor per
        dtype and device when they are mixed).

        A parameter that requires grad but has none this step counts as zeros (its
        gradient is set), so every rank reduces a tensor of the same size.
        """
        if not self.is_distributed:
            return
        buckets: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        for p in parameters:
            if not p.requires_grad:
                continue
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            buckets.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
        for grads in buckets.values():
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat)
            flat /= self._world_size
            offset = 0
            for g in grads:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()

    # -- end ------------------------------------------------------------------------------
    def cleanup(self) -> None:
        """Destroy the process group if this helper created it; idempotent."""
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()
            log.info("destroyed the process group (rank %d)", self._rank)
        self._owns_group = False

    def __enter__(self) -> DistributedHelper:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    def __repr__(self) -> str:
        return (f"DistributedHelper(rank={self._rank}, world_size={self._world_size}, "
                f"local_rank={self.local_rank}, device={self.device})")


def _int_var(env: Mapping[str, str], name: str, default: int) -> int:
    value = env.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {value!r}") from None
