"""What :class:`~weight_sync.torchrl.scheme.WeightSyncTorchRLScheme` reads from the torchrl
collector it is registered with (its *context*): the learner's weights, and which
collectors it can serve."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tensordict import TensorDictBase
from torch import nn
from torchrl.weight_update.utils import _resolve_model

from weight_sync.errors import ConfigError

__all__ = [
    "has_weights", "is_distributed_collector", "model_at", "refuse_in_process", "sender_source",
]


def sender_source(context: Any, model_id: str, model: Any, weights: Any) -> Any:
    """The learner's weights: a model or weights given, else the collector's model at
    ``model_id`` (a path such as ``"env.transform[0].module"``, resolved as torchrl's
    own schemes resolve it)."""
    if model is not None:
        return model
    if weights is not None:
        return weights
    found = None
    why = "no collector given"
    if context is not None:
        try:
            found = model_at(context, model_id)
        except (AttributeError, KeyError, ValueError, IndexError, TypeError) as exc:
            why = f"{type(exc).__name__}: {exc}"
        if found is None and model_id == "policy":
            found = getattr(context, "_fallback_policy", None)
        if found is None and model_id == "policy":
            factories = getattr(context, "policy_factory", None) or ()
            if callable(factories):
                factories = [factories]
            first = next((f for f in factories if f is not None), None)
            found = first() if first is not None else None
    if found is None:
        raise ConfigError(
            f"WeightSyncTorchRLScheme: no weights for model {model_id!r} on the learner "
            f"({why}). The sender is built before the workers start, from the learner's "
            f"copy of the model: for a model that lives only in the workers (an env or "
            f"replay-buffer transform), pass it as WeightSyncTorchRLScheme(weights="
            f"<the learner's copy of that module>)")
    return found


def model_at(context: Any, model_id: str) -> Any:
    """The model of ``context`` at ``model_id``: the collector's ``get_model`` for the
    policy, torchrl's own path resolution for the others."""
    get_model = getattr(context, "get_model", None)
    if model_id == "policy" and callable(get_model):
        return get_model(model_id)
    return _resolve_model(context, model_id)


def has_weights(source: Any) -> bool:
    """False for a policy with nothing to sync: a module without parameters or buffers,
    or a callable that is no module (torchrl's ``RandomPolicy``)."""
    if isinstance(source, nn.Module):
        return any(True for _ in source.parameters()) or any(
            b is not None for b in source.buffers())
    if isinstance(source, (TensorDictBase, Mapping)):
        return True  # empty weights are refused by the sender, naming them
    return not callable(source)


def refuse_in_process(context: Any) -> None:
    """Refuse a single in-process torchrl ``Collector``: it runs the learner's policy
    object itself, in the learner's process, so there are no workers to sync."""
    try:
        from torchrl.collectors import Collector
    except ImportError:
        return
    if type(context) is Collector:
        raise ConfigError(
            "WeightSyncTorchRLScheme: a single in-process torchrl Collector acts with the "
            "learner's own policy object, so there is nothing to sync: drop "
            "weight_sync_schemes, or collect in worker processes with "
            "Collector(..., num_collectors=K, sync=True|False), MultiSyncCollector, "
            "MultiAsyncCollector or DistributedCollector")


def is_distributed_collector(context: Any) -> bool:
    if context is None:
        return False
    try:
        from torchrl.collectors.distributed import DistributedCollector
    except ImportError:
        return False
    return isinstance(context, DistributedCollector)
