"""The Ray object store baseline: what a Ray user writes to keep N actors on the learner's
weights, instead of weight-sync.

Per version the learner ``ray.put``\\s the policy's ``state_dict()`` once; each of N Ray
actors, holding the same policy, ``ray.get``\\s it and ``load_state_dict``\\s it, and the
learner waits for every actor's answer. A round (timed on the learner with
``time.perf_counter``) is that ``ray.put`` + the N ``load`` calls + ``ray.get`` of their
answers; the weights are perturbed (untimed) before each round, warmup rounds are
dropped, and after the last round every actor's weights are compared bit for bit with
the learner's.

``form="numpy"`` puts the leaves as numpy arrays instead (RLlib's ``get_weights``
style), which actors read zero-copy from the object store before loading them.

Ray runs locally for the one measurement and only for it (``ray.init(address="local",
num_cpus=N, include_dashboard=False)``, bound to 127.0.0.1, ``ray.shutdown()`` after),
so its daemons do not run next to the other series of a ``weight-sync bench`` run. The
learner runs ``torch.set_num_threads(1)`` (restored afterwards), each actor
``torch.set_num_threads(1)`` (Ray also sets ``OMP_NUM_THREADS=1`` for a 1-CPU actor).
Every wait is bounded by ``timeout``; the actors are killed at the end, whatever
happened.

    python -m benchmarks.ray_baseline --params 10000000 --kind wide --n 1 4
    python -m benchmarks.ray_baseline --params 10000000 --form numpy
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from benchmarks import policies
from benchmarks.baselines import fingerprint, num_threads, summarize

__all__ = ["FORMS", "RAY_METHOD", "local_ray", "measure_ray"]

ROOT = Path(__file__).resolve().parents[1]
FORMS = ("torch", "numpy")
RAY_METHOD = (
    "learner: ref = ray.put(policy.state_dict()) once per version, then "
    "ray.get([actor.load.remote([ref], version) for each of N actors]); actor.load: "
    "ray.get(ref) + policy.load_state_dict(weights), returns the version. Ray local "
    "(address='local', num_cpus=N, 127.0.0.1, no dashboard), started for this "
    "measurement only; actors num_cpus=1, torch.set_num_threads(1)."
)


class RayCollector:
    """A Ray actor holding the policy (``ray.remote`` wraps it in :func:`measure_ray`)."""

    def __init__(self, params: int, kind: str, seed: int) -> None:
        torch.set_num_threads(1)
        self.policy = policies.make_policy(params, kind, seed)

    def ready(self) -> bool:
        return True

    def load(self, refs: list[Any], version: int, timeout: float) -> int:
        """``ray.get`` the weights (``refs`` holds one ref, so Ray does not resolve it
        before the call) and load them into the policy; returns ``version``."""
        import ray

        weights = ray.get(refs[0], timeout=timeout)
        self.policy.load_state_dict({k: torch.as_tensor(v) for k, v in weights.items()})
        return version

    def fingerprint(self) -> list[int]:
        with torch.no_grad():
            return fingerprint(self.policy)


@contextlib.contextmanager
def local_ray(num_cpus: int) -> Iterator[None]:
    """A local Ray on 127.0.0.1 for the block; its workers import this checkout's
    ``benchmarks`` (torchrl's wheel installs another one), and it is shut down after."""
    import ray

    if ray.is_initialized():
        raise RuntimeError("measure_ray starts its own local Ray; one is already running")
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
             _node_ip_address="127.0.0.1", log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": path}})
    try:
        yield
    finally:
        ray.shutdown()


def measure_ray(
    params: int,
    kind: str = "wide",
    num_collectors: int = 1,
    rounds: int = 30,
    warmup: int = 3,
    timeout: float = 120.0,
    seed: int = 0,
    threads: int | None = 1,
    form: str = "torch",
) -> dict[str, Any]:
    """Time the Ray object store pushing a policy to N actors (see :data:`RAY_METHOD`);
    ``form``: ``"torch"`` puts the ``state_dict()`` as it is, ``"numpy"`` as numpy arrays.

    Returns:
        :func:`~benchmarks.baselines.summarize`'s figures plus ``put_median_s`` (the
        learner's time inside ``ray.put``), ``params``, ``leaves``, ``kind``, ``method``,
        ``setup_s`` (``ray.init`` to every actor built), ``form`` and ``correct`` (every actor
        acknowledged every version and ends bit-equal to the learner).
    """
    import ray

    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    t_setup = time.perf_counter()
    with num_threads(threads), local_ray(num_collectors):
        policy = policies.make_policy(params, kind, seed)
        remote: Any = ray.remote(RayCollector).options(num_cpus=1)
        actors: list[Any] = [remote.remote(params, kind, 1000 + i)
                             for i in range(num_collectors)]
        try:
            ray.get([a.ready.remote() for a in actors], timeout=timeout)
            setup_s = time.perf_counter() - t_setup
            samples, in_put, acked = [], [], True
            for r in range(warmup + rounds):
                with torch.no_grad():
                    for p in policy.parameters():  # the "optimizer step", untimed
                        p.add_(1.0 / 1024)
                t0 = time.perf_counter()
                state = policy.state_dict()
                ref = ray.put(state if form == "torch" else
                              {k: v.numpy() for k, v in state.items()})
                t1 = time.perf_counter()
                versions = ray.get([a.load.remote([ref], r, timeout) for a in actors],
                                   timeout=timeout)
                dt = time.perf_counter() - t0
                acked = acked and versions == [r] * num_collectors
                del ref
                if r >= warmup:
                    samples.append(dt)
                    in_put.append(t1 - t0)
            with torch.no_grad():
                expected = fingerprint(policy)
            got = ray.get([a.fingerprint.remote() for a in actors], timeout=timeout)
        finally:
            for actor in actors:
                ray.kill(actor)
        out = summarize(samples, policies.count_bytes(policy), num_collectors)
    out.update(
        # The median as summarize() takes it: each round's put is inside that round.
        put_median_s=statistics.median(in_put),
        params=float(policies.count_params(policy)),
        leaves=float(policies.count_leaves(policy)),
        kind=kind,
        form=form,
        method=RAY_METHOD,
        setup_s=setup_s,
        correct=acked and all(fp == expected for fp in got),
    )
    return out


if __name__ == "__main__":
    import argparse
    import json

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", type=int, default=1_000_000)
    parser.add_argument("--kind", default="wide", choices=policies.KINDS)
    parser.add_argument("--n", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--form", choices=FORMS, default="torch")
    args = parser.parse_args()
    for n in args.n:
        res = measure_ray(args.params, args.kind, n, args.rounds, args.warmup, args.timeout,
                          form=args.form)
        print(json.dumps({k: v for k, v in res.items() if k not in ("samples_s", "method")}))
