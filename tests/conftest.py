"""Shared fixtures: the policies the tests sync (built by ``models.py``), and the
``cluster`` of spawned children (``harness.py``, running the collectors and learner of
``versioned.py``) that is always reaped."""

from __future__ import annotations

import os

# Ray reads this once, when it is first imported, and torchrl.collectors imports Ray when
# it is installed: set it before anything imports torchrl. With it a local Ray binds and
# advertises 127.0.0.1 only (tests/test_ray_collectors.py); without it, on Linux, the
# host's outbound address.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from collections.abc import Iterator

import models
import pytest
import torch
import versioned
from harness import CTX, Cluster
from tensordict import TensorDict


@pytest.fixture
def mlp() -> torch.nn.Module:
    """A small MLP with float32 parameters and BatchNorm buffers (int64 included)."""
    return models.make_mlp(seed=0)


@pytest.fixture
def real_policy() -> TensorDict:
    """Nested TensorDict, float32 + bfloat16 + int64 leaves, ~300 of them."""
    return models.make_real_policy(seed=0)


@pytest.fixture
def mixed_leaves() -> dict[str, torch.Tensor]:
    """A state_dict of every common dtype, with non-contiguous and odd-shaped sources."""
    gen = torch.Generator().manual_seed(7)
    base = torch.randn(6, 10, generator=gen)
    return {
        "f32": torch.randn(3, 5, generator=gen),
        "f32_transposed": base.t(),                       # non-contiguous
        "f32_strided": base[:, ::3],                      # non-contiguous, gaps
        "f64": torch.randn(7, generator=gen, dtype=torch.float64),
        "f16": torch.randn(5, generator=gen).half(),
        "bf16": torch.randn(4, 3, generator=gen).bfloat16(),
        "bf16_odd": torch.randn(3, generator=gen).bfloat16(),  # 6 bytes: alignment
        "i64_scalar": torch.tensor(123456789012, dtype=torch.int64),
        "i32": torch.arange(-5, 6, dtype=torch.int32),
        "i8": torch.arange(-3, 4, dtype=torch.int8),
        "u8": torch.arange(0, 255, 17, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "empty": torch.empty(0, 4),
        "expanded": torch.randn(1, 4, generator=gen).expand(3, 4),  # stride 0
    }


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    """Children spawned through it are killed and joined after the test, checked gone.
    Its default collector and learner are :func:`versioned.collector_main` and
    :func:`versioned.learner_main`."""
    c = Cluster(collector=versioned.collector_main, learner=versioned.learner_main)
    try:
        yield c
    finally:
        c.shutdown()
    assert not [p for p in CTX.active_children() if p in c.processes]
