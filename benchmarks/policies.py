"""Deterministic policy builders for the weight-sync benchmarks.

Two shapes of policy are offered, both sized arithmetically to a target parameter
count (the hidden width is solved from a quadratic, no trial allocation):

* ``"wide"``: a 4-layer MLP, 8 leaves (4 ``Linear`` weights + biases). This is the
  shape the DESIGN.md table was measured on.
* ``"deep"``: a stack of ``Linear`` + ``LayerNorm`` blocks closed by a ``Linear``
  head, 298 leaves (like a real policy with hundreds of tensors), which exposes
  per-tensor costs of a transport.

Every process that calls ``make_policy(params, kind, seed)`` gets bit-identical
weights: the build runs under a forked RNG seeded with ``seed``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

OBS_DIM = 64
"""Input width of every benchmark policy."""
ACT_DIM = 16
"""Output width of every benchmark policy."""
DEEP_BLOCKS = 74
"""Number of ``Linear`` + ``LayerNorm`` blocks of the ``"deep"`` policy (4 leaves each)."""
KINDS = ("wide", "deep")


def _wide_coeffs() -> tuple[int, int, int]:
    """Return ``(a, b, c)`` with ``params(h) = a*h**2 + b*h + c`` for the wide MLP.

    Layers: ``obs->h``, ``h->h``, ``h->h``, ``h->act``, all with biases.
    """
    return 2, OBS_DIM + ACT_DIM + 3, ACT_DIM


def _deep_coeffs() -> tuple[int, int, int]:
    """Return ``(a, b, c)`` with ``params(h) = a*h**2 + b*h + c`` for the deep stack.

    Blocks: ``Linear(obs, h) + LayerNorm(h)``, then ``DEEP_BLOCKS - 1`` times
    ``Linear(h, h) + LayerNorm(h)``, then a ``Linear(h, act)`` head.
    """
    k = DEEP_BLOCKS - 1
    a = k
    b = OBS_DIM + 1 + 2 + k * 3 + ACT_DIM
    return a, b, ACT_DIM


def _coeffs(kind: str) -> tuple[int, int, int]:
    if kind == "wide":
        return _wide_coeffs()
    if kind == "deep":
        return _deep_coeffs()
    raise ValueError(f"unknown policy kind {kind!r}; expected one of {KINDS}")


def predicted_params(hidden: int, kind: str = "wide") -> int:
    """Return the exact parameter count of a ``kind`` policy with width ``hidden``."""
    a, b, c = _coeffs(kind)
    return a * hidden * hidden + b * hidden + c


def hidden_width(params: int, kind: str = "wide") -> int:
    """Solve for the hidden width whose parameter count is closest to ``params``."""
    if params <= 0:
        raise ValueError(f"params must be positive, got {params}")
    a, b, c = _coeffs(kind)
    disc = b * b - 4 * a * (c - params)
    root = (-b + math.sqrt(max(disc, 0))) / (2 * a)
    candidates = {max(1, math.floor(root)), max(1, math.ceil(root))}
    return min(candidates, key=lambda h: abs(predicted_params(h, kind) - params))


def _build(kind: str, hidden: int) -> nn.Module:
    if kind == "wide":
        return nn.Sequential(
            nn.Linear(OBS_DIM, hidden),
            nn.Tanh(),
            nn.Linear(hidden, hidden),
            nn.Tanh(),
            nn.Linear(hidden, hidden),
            nn.Tanh(),
            nn.Linear(hidden, ACT_DIM),
        )
    layers: list[nn.Module] = []
    in_dim = OBS_DIM
    for _ in range(DEEP_BLOCKS):
        layers += [nn.Linear(in_dim, hidden), nn.LayerNorm(hidden), nn.Tanh()]
        in_dim = hidden
    layers.append(nn.Linear(hidden, ACT_DIM))
    return nn.Sequential(*layers)


def make_policy(params: int, kind: str = "wide", seed: int = 0) -> nn.Module:
    """Build a deterministic ``kind`` policy with about ``params`` parameters.

    Args:
        params: target parameter count (the result is within a few percent for
            ``params >= 10_000``; the width is solved arithmetically).
        kind: ``"wide"`` (8 leaves) or ``"deep"`` (298 leaves).
        seed: RNG seed; equal arguments give bit-identical weights in any process.

    Returns:
        A CPU ``float32`` module with ``requires_grad`` parameters in eval mode.
    """
    hidden = hidden_width(params, kind)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = _build(kind, hidden)
    return module.eval()


def count_params(module: nn.Module) -> int:
    """Return the number of parameter elements of ``module``."""
    return sum(p.numel() for p in module.parameters())


def count_leaves(module: nn.Module) -> int:
    """Return the number of tensors (parameters + buffers) of ``module``."""
    return sum(1 for _ in module.parameters()) + sum(1 for _ in module.buffers())


def count_bytes(module: nn.Module) -> int:
    """Return the number of bytes held by the parameters and buffers of ``module``."""
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)
