"""The RL task and algorithm used by the ``weight-sync`` demo.

The demo runs one learner process and several collector processes. Collectors build an
environment with :func:`make_env` and a copy of the actor with :func:`make_policy`, roll out
batches of transitions and send them to the learner; the learner owns a :class:`PPOLearner`
(actor + the critic from :func:`make_value`) and broadcasts the actor's parameters back.

The task is Gymnasium's ``CartPole-v1`` (wrapped by torchrl) solved with PPO (clipped
objective, GAE advantages). It learns visibly within a minute or two on a couple of CPU cores:
the average episode return climbs from ~20 (random policy) to several hundred.

Nothing in this module starts processes or threads; every factory builds its object from
scratch, so each process can call them independently. Parameter initialisation is governed by
the caller's ``torch.manual_seed``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import torch
from tensordict import TensorDictBase
from tensordict.nn import TensorDictModule
from torch import nn
from torchrl.envs import Compose, EnvBase, GymEnv, RewardSum, StepCounter, TransformedEnv
from torchrl.envs.utils import ExplorationType, set_exploration_type, step_mdp
from torchrl.modules import MLP, ProbabilisticActor, ValueOperator
from torchrl.objectives import ClipPPOLoss
from torchrl.objectives.value import GAE

__all__ = [
    "ENV_NAME",
    "PPOLearner",
    "TaskConfig",
    "collect",
    "episode_returns",
    "make_env",
    "make_policy",
    "make_value",
]

logger = logging.getLogger(__name__)

ENV_NAME = "CartPole-v1"
"""Gymnasium id of the environment."""
OBS_DIM = 4
"""Size of CartPole's observation vector."""
N_ACTIONS = 2
"""Number of discrete CartPole actions (push left / push right)."""
_METRIC_KEYS = ("loss_objective", "loss_critic", "loss_entropy", "entropy", "kl_approx")


@dataclass(frozen=True)
class TaskConfig:
    """Hyper-parameters of the task; the defaults learn CartPole quickly on a few CPU cores."""

    frames_per_batch: int = 256
    """Transitions each collector gathers per batch (before sending it to the learner)."""
    hidden: int = 64
    """Width of the two hidden layers of the actor and critic MLPs."""
    lr: float = 3e-3
    """Adam learning rate shared by actor and critic."""
    epochs: int = 4
    """PPO passes over each received batch."""
    minibatch_size: int = 128
    """Transitions per gradient step within an epoch."""
    gamma: float = 0.99
    """Discount factor."""
    lmbda: float = 0.95
    """GAE lambda (bias/variance trade-off of the advantage estimate)."""
    clip_epsilon: float = 0.2
    """PPO ratio clipping range."""
    entropy_coef: float = 0.01
    """Weight of the entropy bonus."""
    critic_coef: float = 0.5
    """Weight of the value-function loss."""
    max_grad_norm: float = 1.0
    """Global gradient-norm clipping threshold."""


def make_env(seed: int) -> EnvBase:
    """Build a seeded CartPole-v1 env that counts steps and sums episode rewards.

    Completed episodes carry their return in ``("next", "episode_reward")`` at done steps.
    """
    env = TransformedEnv(
        GymEnv(ENV_NAME, categorical_action_encoding=True),
        Compose(StepCounter(), RewardSum()),
    )
    env.set_seed(seed)
    return env


def make_policy(hidden: int = TaskConfig.hidden) -> ProbabilisticActor:
    """Build the stochastic actor: observation -> logits -> categorical action + log-prob.

    Its parameters are what the learner syncs to the collectors. Writes ``"logits"``,
    ``"action"`` and the action log-prob (key listed in ``policy.log_prob_keys``).
    """
    net = MLP(
        in_features=OBS_DIM,
        out_features=N_ACTIONS,
        num_cells=[hidden, hidden],
        activation_class=nn.Tanh,
    )
    module = TensorDictModule(net, in_keys=["observation"], out_keys=["logits"])
    return ProbabilisticActor(
        module,
        in_keys=["logits"],
        out_keys=["action"],
        distribution_class=torch.distributions.Categorical,
        return_log_prob=True,
    )


def make_value(hidden: int = TaskConfig.hidden) -> ValueOperator:
    """Build the critic: observation -> ``"state_value"`` (used by the learner only)."""
    net = MLP(
        in_features=OBS_DIM, out_features=1, num_cells=[hidden, hidden], activation_class=nn.Tanh
    )
    return ValueOperator(net, in_keys=["observation"])


def collect(
    env: EnvBase,
    policy: TensorDictModule,
    frames: int,
    state: TensorDictBase | None = None,
) -> tuple[TensorDictBase, TensorDictBase | None]:
    """Roll ``policy`` (sampling actions) for ``frames`` steps, continuing episodes.

    ``state`` is what the previous call returned (``None`` resets the env first); pass it back
    so episodes span batches and can reach CartPole's 500-step cap. Returns the ``[frames]``
    batch and the state to resume from.
    """
    with torch.no_grad(), set_exploration_type(ExplorationType.RANDOM):
        batch = env.rollout(
            frames,
            policy,
            break_when_any_done=False,
            auto_reset=state is None,
            tensordict=state,
        )
    last = step_mdp(batch[-1], keep_other=False)
    return batch, None if bool(last.get("done").any()) else last


def episode_returns(batch: TensorDictBase) -> list[float]:
    """Returns of the episodes that finished inside ``batch`` (any batch shape)."""
    done = batch.get(("next", "done")).reshape(-1)
    totals = batch.get(("next", "episode_reward")).reshape(-1)
    return totals[done].tolist()


def _mark_discontinuities(batch: TensorDictBase) -> TensorDictBase:
    """Return a shallow copy of ``batch`` whose done flags also cut non-contiguous steps.

    Batches from several collectors (or successive rollouts) may be concatenated along the
    time dimension (the last one). Wherever step ``t+1`` does not start from step ``t``'s next
    observation, the trajectory is cut there: ``done``/``truncated`` are set (not
    ``terminated``), so GAE stops propagating and bootstraps from the critic instead.
    """
    out = batch.copy()
    nxt = out.get("next").copy()
    out.set("next", nxt)
    if batch.shape[-1] < 2:
        return out
    next_obs = batch.get(("next", "observation"))[..., :-1, :]
    obs = batch.get("observation")[..., 1:, :]
    done = nxt.get("done").clone()
    cut = (next_obs != obs).any(-1, keepdim=True) & ~done[..., :-1, :]
    done[..., :-1, :] |= cut
    nxt.set("done", done)
    if "truncated" in nxt:
        trunc = nxt.get("truncated").clone()
        trunc[..., :-1, :] |= cut
        nxt.set("truncated", trunc)
    return out


class PPOLearner:
    """Clipped PPO with GAE advantages over batches of collected transitions."""

    def __init__(
        self,
        policy: ProbabilisticActor,
        value: ValueOperator,
        *,
        lr: float = TaskConfig.lr,
        epochs: int = TaskConfig.epochs,
        minibatch_size: int = TaskConfig.minibatch_size,
        gamma: float = TaskConfig.gamma,
        lmbda: float = TaskConfig.lmbda,
        clip_epsilon: float = TaskConfig.clip_epsilon,
        entropy_coef: float = TaskConfig.entropy_coef,
        critic_coef: float = TaskConfig.critic_coef,
        max_grad_norm: float = TaskConfig.max_grad_norm,
        reduce_gradients: Callable[[Iterable[torch.Tensor]], None] | None = None,
    ) -> None:
        self.policy = policy
        self.reduce_gradients = reduce_gradients
        """Called on the loss's parameters after each backward pass, before clipping (a
        data-parallel learner averages the ranks' gradients here, e.g.
        ``DistributedHelper.reduce_gradients``)."""
        self.value = value
        self.epochs = epochs
        self.minibatch_size = minibatch_size
        self.max_grad_norm = max_grad_norm
        self.loss = ClipPPOLoss(
            actor_network=policy,
            critic_network=value,
            clip_epsilon=clip_epsilon,
            entropy_coeff=entropy_coef,
            critic_coeff=critic_coef,
            loss_critic_type="smooth_l1",
            normalize_advantage=True,
        )
        self.advantage = GAE(gamma=gamma, lmbda=lmbda, value_network=value, average_gae=False)
        self.optimizer = torch.optim.Adam(self.loss.parameters(), lr=lr)
        self.updates = 0

    @classmethod
    def from_config(
        cls,
        policy: ProbabilisticActor,
        value: ValueOperator,
        config: TaskConfig,
        reduce_gradients: Callable[[Iterable[torch.Tensor]], None] | None = None,
    ) -> PPOLearner:
        """Build a learner with the hyper-parameters of ``config``."""
        learner_fields = asdict(config)
        for name in ("frames_per_batch", "hidden"):
            del learner_fields[name]
        return cls(policy, value, reduce_gradients=reduce_gradients, **learner_fields)

    def update(self, batch: TensorDictBase) -> dict[str, float]:
        """Run GAE and ``epochs`` PPO epochs on ``batch``; return averaged metrics.

        ``batch`` is shaped ``[T]`` (one or several trajectories concatenated in time order)
        or ``[N, T]`` (one row per collector); time must be the last dimension.
        """
        data = _mark_discontinuities(batch)
        with torch.no_grad():
            self.advantage(data)
        flat = data.reshape(-1)
        n = flat.shape[0]
        sums: dict[str, float] = {}
        steps = 0
        for _ in range(self.epochs):
            for idx in torch.randperm(n).split(self.minibatch_size):
                losses = self.loss(flat[idx])
                total = losses["loss_objective"] + losses["loss_critic"] + losses["loss_entropy"]
                self.optimizer.zero_grad()
                total.backward()
                if self.reduce_gradients is not None:
                    self.reduce_gradients(self.loss.parameters())
                grad_norm = nn.utils.clip_grad_norm_(self.loss.parameters(), self.max_grad_norm)
                self.optimizer.step()
                steps += 1
                for key in _METRIC_KEYS:
                    if key in losses:
                        sums[key] = sums.get(key, 0.0) + float(losses[key].detach().mean())
                sums["grad_norm"] = sums.get("grad_norm", 0.0) + float(grad_norm)
        self.updates += 1
        metrics = {key: value / max(steps, 1) for key, value in sums.items()}
        metrics["frames"] = float(n)
        metrics["value_target_mean"] = float(data.get("value_target").mean())
        logger.debug("PPO update %d: %s", self.updates, metrics)
        return metrics
