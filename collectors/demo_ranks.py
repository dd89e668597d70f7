"""``weight-sync demo --learners N``: the PPO learner as N data-parallel CPU ranks.

:func:`launch` starts the ranks on this host with torchrun (``python -m
torch.distributed.run --standalone --nproc-per-node N -m weight_sync.cli demo ...``);
the same command line then runs in every rank, where :class:`DemoRank` holds what a
rank does differently from the single learner:

* it joins the process group with :class:`~weight_sync.training.DistributedHelper`, starts from
  rank 0's weights, then seeds its own sampling with ``seed + rank``;
* it serves collectors ``i % N == rank`` (``--collectors / N`` of them) through its
  :class:`~weight_sync.training.DataParallelSender`, in a
  :class:`~weight_sync.collectors.group.CollectorGroup`
  of its own;
* each PPO minibatch uses ``minibatch_size / N`` of its own transitions and the
  gradients are averaged over the ranks (one flat all-reduce per gradient step), so
  the global batch and minibatch are those of the single learner and every rank
  holds the same weights after each step;
* episode returns are gathered from every rank; rank 0 alone draws the progress bar,
  prints the summary and writes ``--json-out``. Its sync figures are those of rank 0's
  collectors.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from typing import Any

import torch
from weight_sync.collectors.group import CollectorGroup
from weight_sync.collectors.task import PPOLearner, TaskConfig, collect, make_env, make_policy

from weight_sync.errors import ConfigError
from weight_sync.training import DataParallelSender, DistributedHelper

__all__ = ["DemoRank", "in_rank", "launch"]

log = logging.getLogger(__name__)

# How long the ranks may take to exit after an interrupt before they are killed.
_EXIT_GRACE_S = 30.0


def in_rank() -> bool:
    """Whether this process is a rank started by a launcher (torchrun sets WORLD_SIZE)."""
    return "WORLD_SIZE" in os.environ


def launch(demo_argv: list[str], learners: int) -> int:
    """Run ``weight-sync demo demo_argv`` as ``learners`` ranks under torchrun on this
    host; returns torchrun's exit status (non-zero if any rank failed: torchrun then
    stops the others), or 130 after Ctrl-C once every rank has stopped."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", str(learners), "--max-restarts", "0",
               "-m", "weight_sync.cli", "demo", *demo_argv]
    log.info("starting %d learner ranks: %s", learners, " ".join(command))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(command, env=env)
    try:
        return proc.wait()
    except KeyboardInterrupt:  # the ranks got the same SIGINT; give them time to stop
        try:
            proc.wait(_EXIT_GRACE_S)
            return 130
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


class DemoRank:
    """One rank of the data-parallel demo learner (see the module docstring).

    Raises:
        ConfigError: the world size is not ``args.learners``, or ``args.collectors`` is
            not divisible by it (every rank must take as many gradient steps).
    """

    def __init__(self, args: argparse.Namespace) -> None:
        self.helper = DistributedHelper(timeout=max(60.0, args.sync_timeout))
        self.world = self.helper.get_world_size()
        if self.world != args.learners:
            raise ConfigError(f"--learners {args.learners} but the launcher started "
                              f"{self.world} rank(s)")
        if args.collectors % self.world:
            raise ConfigError(f"--collectors {args.collectors} is not divisible by "
                              f"--learners {self.world}")
        self.share = args.collectors // self.world
        """Collectors this rank serves."""

    def is_writer(self) -> bool:
        return self.helper.is_writer()

    def learner(self, policy: Any, value: Any, config: TaskConfig, seed: int) -> PPOLearner:
        """Rank 0's initial weights everywhere, this rank's own sampling seed, the
        minibatch split between the ranks and the gradients averaged over them."""
        self.helper.broadcast_parameters(policy)
        self.helper.broadcast_parameters(value)
        torch.manual_seed(self.helper.seed(seed))
        config = self.helper.scale_batch_config(config, "minibatch_size")
        return PPOLearner.from_config(policy, value, config,
                                      reduce_gradients=self.helper.reduce_gradients)

    def group(self, args: argparse.Namespace, policy: Any) -> CollectorGroup:
        """This rank's collectors, served by its :class:`DataParallelSender`."""
        dp = DataParallelSender(policy, args.collectors)
        assert dp.sender is not None and len(dp.served()) == self.share
        return CollectorGroup(policy, make_env, make_policy, num_collectors=self.share,
                              frames_per_batch=args.frames_per_batch,
                              seed=self.helper.seed(args.seed), collect_fn=collect,
                              sender=dp.sender)

    def gather_returns(self, returns: list[float]) -> list[float]:
        """Every rank's finished-episode returns, rank 0's first."""
        return [r for mine in self.helper.all_gather_object(returns) for r in mine]

    def in_sync(self, policy: Any) -> bool:
        """Whether every rank holds bit-equal weights of ``policy``."""
        mine = torch.cat([p.detach().reshape(-1) for p in policy.parameters()])
        return all(torch.equal(mine, theirs) for theirs in self.helper.all_gather(mine))

    def close(self) -> None:
        self.helper.cleanup()
