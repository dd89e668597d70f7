""":class:`~weight_sync.training.DistributedHelper` as a single process and as 2 real gloo ranks
(spawned processes that join through torchrun's variables on a free port)."""

from __future__ import annotations

import dataclasses
import os
import time
from datetime import timedelta
from typing import Any

import pytest
import torch
import torch.distributed as dist
from harness import free_port, run_processes
from torch import nn

from weight_sync import WeightSyncTimeout
from weight_sync.errors import ConfigError, ConnectionFailed
from weight_sync.training import DistributedHelper, slurm_environ


@dataclasses.dataclass(frozen=True)
class Batches:
    batch_size: int = 512
    minibatch_size: int = 128
    epochs: int = 4


def _torchrun_env(rank: int, world: int, port: int) -> dict[str, str]:
    return {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}


# -- children (module level: picklable by reference) -------------------------------------
def helper_rank(rank: int, port: int, adopt_port: int) -> dict[str, Any]:
    """Exercise every method on one of 2 ranks; return what it saw."""
    os.environ.update(_torchrun_env(rank, 2, port))
    seen: dict[str, Any] = {}
    helper = DistributedHelper(timeout=60)
    seen["who"] = (helper.get_rank(), helper.get_world_size(), helper.is_distributed,
                   helper.is_master(), helper.local_rank, helper.seed(10))
    seen["should"] = (helper.should_log(), helper.should_checkpoint(),
                      helper.should_evaluate(), helper.is_writer())
    seen["broadcast"] = helper.broadcast_from_master({"from": rank})
    total = torch.tensor([rank + 1.0])
    seen["all_reduce_same_tensor"] = helper.all_reduce(total) is total
    seen["all_reduce_sum"] = total.item()
    seen["all_reduce_max"] = helper.all_reduce(torch.tensor([rank + 1.0]),
                                               dist.ReduceOp.MAX).item()
    seen["all_gather"] = [t.tolist() for t in helper.all_gather(torch.tensor([rank, 10 * rank]))]
    seen["all_gather_object"] = helper.all_gather_object(f"rank-{rank}")
    seen["scaled"] = dataclasses.astuple(
        helper.scale_batch_config(Batches(), "batch_size", "minibatch_size"))
    try:
        helper.scale_batch_config(Batches(batch_size=511), "batch_size")
        seen["indivisible"] = "accepted"
    except ConfigError as exc:
        seen["indivisible"] = str(exc)

    # Gradients: rank r's gradient of a parameter is (r + 1) * base; "b" has none on rank 1.
    w, b = nn.Parameter(torch.zeros(3, 2)), nn.Parameter(torch.zeros(2))
    w.grad = torch.arange(6.0).reshape(3, 2) * (rank + 1)
    if rank == 0:
        b.grad = torch.tensor([4.0, -2.0])
    h = nn.Parameter(torch.zeros(2, dtype=torch.float64))  # another dtype: its own bucket
    h.grad = torch.full((2,), 2.0 * rank, dtype=torch.float64)
    helper.reduce_gradients([w, h, b, torch.zeros(2)])  # no requires_grad: skipped
    seen["reduced"] = (w.grad.tolist(), None if b.grad is None else b.grad.tolist(),
                       h.grad.tolist())

    torch.manual_seed(rank)  # different weights on each rank, until broadcast
    module = nn.Linear(3, 2)
    helper.broadcast_parameters(module)
    seen["broadcast_parameters"] = [p.detach().reshape(-1).tolist() for p in module.parameters()]

    # DDP: each rank's own input, gradients averaged by DDP's hooks.
    torch.manual_seed(0)
    policy = nn.Linear(3, 1, bias=False)
    wrapped = helper.wrap_policy(policy)
    seen["wrapped"] = type(wrapped).__name__
    x = torch.full((1, 3), float(rank + 1))
    wrapped(x).sum().backward()
    seen["ddp_grad"] = policy.weight.grad.reshape(-1).tolist()  # mean of [1,1,1] and [2,2,2]

    helper.synchronize()
    helper.cleanup()
    helper.cleanup()  # idempotent
    seen["after_cleanup"] = dist.is_initialized()

    # A group that already exists (as torchrunx starts one) is adopted and left alone.
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{adopt_port}", rank=rank,
                            world_size=2, timeout=timedelta(seconds=60))
    adopted = DistributedHelper(timeout=60)
    seen["adopted"] = (adopted.get_rank(), adopted.get_world_size(),
                       adopted.broadcast_from_master(rank))
    adopted.cleanup()
    seen["adopted_left_alone"] = dist.is_initialized()
    dist.destroy_process_group()
    return seen


def lone_rank(rank: int, port: int) -> tuple[str, str, float]:
    """One rank of 2 whose peer never comes: the typed error and how long it took."""
    os.environ.update(_torchrun_env(rank, 2, port))
    start = time.monotonic()
    try:
        DistributedHelper(timeout=2)
    except (ConnectionFailed, WeightSyncTimeout) as exc:
        return type(exc).__name__, str(exc), time.monotonic() - start
    return "joined", "", time.monotonic() - start


def slurm_rank(procid: int, port: int) -> tuple[int, int, int, float]:
    """A rank started as ``srun`` starts a task: SLURM's variables, no torchrun ones."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        os.environ.pop(name, None)
    os.environ.update(SLURM_PROCID=str(procid), SLURM_NTASKS="2", SLURM_LOCALID=str(procid),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    with DistributedHelper(timeout=60, environ=slurm_environ()) as helper:
        total = helper.all_reduce(torch.tensor([procid + 1.0])).item()
        return helper.get_rank(), helper.get_world_size(), helper.local_rank, total


# -- tests --------------------------------------------------------------------------------
def test_single_process_is_a_no_op() -> None:
    helper = DistributedHelper(environ={})
    assert not helper.is_distributed and helper.is_master() and helper.is_writer()
    assert helper.device == torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    assert (helper.get_rank(), helper.get_world_size(), helper.seed(7)) == (0, 1, 7)
    assert helper.should_log() and helper.should_checkpoint() and helper.should_evaluate()
    assert helper.scale_batch_config(Batches(), "batch_size", "minibatch_size") == Batches()
    policy = nn.Linear(2, 2)
    assert helper.wrap_policy(policy) is policy
    t = torch.tensor([1.0, 2.0])
    assert helper.all_reduce(t) is t and t.tolist() == [1.0, 2.0]
    assert helper.all_gather(t) == [t]
    assert helper.all_gather_object("x") == ["x"]
    state = {"a": 1}
    assert helper.broadcast_from_master(state) is state
    policy.weight.grad = torch.ones(2, 2)
    helper.reduce_gradients(policy.parameters())
    assert policy.weight.grad.tolist() == [[1.0, 1.0], [1.0, 1.0]]
    helper.synchronize()
    with helper:
        pass
    assert not dist.is_initialized()
    with pytest.raises(ConfigError, match=r"Batches\.missing must be a positive int.* None"):
        helper.scale_batch_config(Batches(), "missing")
    with pytest.raises(ConfigError, match="needs a dataclass instance, got"):
        helper.scale_batch_config({"batch_size": 4})


def test_bad_environment_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"WORLD_SIZE='2' but \['MASTER_ADDR', 'MASTER_PORT'\]"):
        DistributedHelper(environ={"WORLD_SIZE": "2", "RANK": "0"})
    with pytest.raises(ConfigError, match="LOCAL_RANK must be an integer, got 'x'"):
        DistributedHelper(environ={"LOCAL_RANK": "x"})
    # A stray RANK in a single process does not make it rank 1 of 1.
    assert DistributedHelper(environ={"RANK": "1"}).get_rank() == 0


def test_two_gloo_ranks() -> None:
    port, adopt_port = free_port(), free_port()
    seen = run_processes([(helper_rank, (r, port, adopt_port)) for r in (0, 1)], timeout=150)
    for rank, got in enumerate(seen):
        assert got["who"] == (rank, 2, True, rank == 0, rank, 10 + rank)
        assert got["should"] == (rank == 0,) * 4
        assert got["broadcast"] == {"from": 0}
        assert got["all_reduce_same_tensor"] and got["all_reduce_sum"] == 3.0
        assert got["all_reduce_max"] == 2.0
        assert got["all_gather"] == [[0, 0], [1, 10]]
        assert got["all_gather_object"] == ["rank-0", "rank-1"]
        assert got["scaled"] == (256, 64, 4)  # the global batch stays 512 / 128
        assert "Batches.batch_size=511 is not divisible by the world size 2" in got["indivisible"]
        # mean of 1x and 2x the base; b: rank 0's [4, -2] averaged with rank 1's zeros
        assert got["reduced"] == ([[0.0, 1.5], [3.0, 4.5], [6.0, 7.5]], [2.0, -1.0], [1.0, 1.0])
        assert got["wrapped"] == "DistributedDataParallel"
        assert got["ddp_grad"] == [1.5, 1.5, 1.5]
        assert got["after_cleanup"] is False
        assert got["adopted"] == (rank, 2, 0) and got["adopted_left_alone"] is True
    assert seen[0]["broadcast_parameters"] == seen[1]["broadcast_parameters"]
    torch.manual_seed(0)
    assert seen[1]["broadcast_parameters"] == [p.detach().reshape(-1).tolist()
                                               for p in nn.Linear(3, 2).parameters()]


def test_rendezvous_that_does_not_answer_is_bounded() -> None:
    """Rank 1 finds no store at MASTER_ADDR:MASTER_PORT; rank 0 waits for a peer that
    never comes: each a typed error naming the address, within the timeout."""
    nobody, alone = free_port(), free_port()
    (kind1, msg1, took1), (kind0, msg0, took0) = run_processes(
        [(lone_rank, (1, nobody)), (lone_rank, (0, alone))], timeout=60)
    assert kind1 == "ConnectionFailed" and f"127.0.0.1:{nobody} did not answer" in msg1
    assert kind0 == "WeightSyncTimeout" and f"not all 2 ranks joined the rendezvous at " \
                                               f"127.0.0.1:{alone}" in msg0
    assert took1 < 30 and took0 < 30  # bounded by the 2 s timeout (plus retries)


def test_slurm_variables_mapped() -> None:
    env = slurm_environ({"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
                         "WORLD_SIZE": "8", "MASTER_ADDR": "node1"})
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("3", "8", "1")
    assert slurm_environ({"RANK": "0", "SLURM_PROCID": "5"})["RANK"] == "0"  # torchrun's win
    assert "RANK" not in slurm_environ({})


def test_two_ranks_started_like_srun_tasks() -> None:
    port = free_port()
    seen = run_processes([(slurm_rank, (p, port)) for p in (0, 1)], timeout=90)
    assert seen == [(0, 2, 0, 3.0), (1, 2, 1, 3.0)]
