"""Policies the tests sync, and exact fingerprints of their weights.

Plain functions (not fixtures) so that spawned collector processes can build the
same policies from a name and a seed; ``conftest.py`` wraps them as fixtures.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from tensordict import TensorDict

from weight_sync.wire.layout import named_leaves

__all__ = ["REAL_BLOCKS", "build", "fingerprint", "leaf_bytes", "make_mlp", "make_real_policy",
           "mutate"]

#: Blocks of :func:`make_real_policy`; 12 leaves each.
REAL_BLOCKS = 25


def make_mlp(seed: int = 0, *, out: int = 4) -> torch.nn.Module:
    """A small MLP with a BatchNorm (so an int64 ``num_batches_tracked`` buffer)."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 32), torch.nn.BatchNorm1d(32), torch.nn.ReLU(), torch.nn.Linear(32, out)
    )
    with torch.no_grad():
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 2.0)
        model[1].num_batches_tracked.fill_(seed + 1)
    return model


def make_real_policy(seed: int = 0) -> TensorDict:
    """A "real" policy: nested TensorDict, float32 + bfloat16 + int64, 300 leaves."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype)

    blocks = {}
    for b in range(REAL_BLOCKS):
        blocks[f"block{b:02d}"] = {
            "attn": {
                "q": {"weight": randn(16, 16), "bias": randn(16)},
                "k": {"weight": randn(16, 16), "bias": randn(16)},
                "v": {"weight": randn(16, 16, dtype=torch.bfloat16),
                      "bias": randn(16, dtype=torch.bfloat16)},
            },
            "norm": {
                "weight": randn(16, dtype=torch.bfloat16),
                "bias": randn(16, dtype=torch.bfloat16),
                "running_mean": randn(16),
                "running_var": randn(16).abs(),
                "num_batches_tracked": torch.tensor(seed * 1000 + b, dtype=torch.int64),
            },
            "mlp": {"weight": randn(24, 16)},
        }
    return TensorDict({"encoder": blocks, "head": {"logits": randn(5, 16)}}, batch_size=[])


def build(name: str, seed: int) -> Any:
    """Build a policy by name (what a spawned collector is told to build)."""
    if name == "mlp":
        return make_mlp(seed)
    if name == "real":
        return make_real_policy(seed)
    raise ValueError(f"unknown policy {name!r}")


def leaf_bytes(tensor: torch.Tensor) -> bytes:
    """The exact bytes of a tensor's values (any dtype, any strides)."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes()


def fingerprint(policy: Any) -> str:
    """SHA-256 over every leaf's name, dtype, shape and exact bytes."""
    digest = hashlib.sha256()
    for name, tensor in named_leaves(policy).items():
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(leaf_bytes(tensor))
    return digest.hexdigest()


@torch.no_grad()
def mutate(policy: Any, step: int) -> None:
    """Change every leaf in place (an "optimizer step"), deterministically."""
    for i, tensor in enumerate(named_leaves(policy).values()):
        if tensor.is_floating_point():
            tensor.add_(0.001 * (step + 1) * (1 + i % 7))
        else:
            tensor.add_(step + 1)
