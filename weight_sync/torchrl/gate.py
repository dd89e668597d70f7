"""Keeping a background apply out of a torchrl worker's policy calls."""

from __future__ import annotations

import threading
import weakref
from typing import Any

from torch import nn

__all__ = ["PolicyGate"]


class PolicyGate:
    """Keeps applies out of the worker's policy calls.

    torchrl's worker loop never hands control to the scheme, so versions are applied
    from a background thread while the worker rolls out. Without a gate an apply could
    land in the middle of a policy call (some layers old, some new: an action from a
    policy that never existed). The policy's forward pre/post hooks hold :attr:`lock`
    for each call, the background thread holds it for each apply, and a worker idle
    between rollouts holds nothing, so ``send()`` never waits on the rollout loop.
    """

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.arrived = threading.Event()
        """Set when a version was received (a :class:`ReceiverHooks` ``after_receive``)."""
        self._depth = threading.local()
        self._handles: list[Any] = []
        self._guarded: weakref.WeakSet[nn.Module] = weakref.WeakSet()

    def guard(self, model: Any) -> None:
        """Hook ``model``'s forward (once per module; other policies are not gated)."""
        if not isinstance(model, nn.Module) or model in self._guarded:
            return
        self._guarded.add(model)
        self._handles.append(model.register_forward_pre_hook(self._enter))
        self._handles.append(model.register_forward_hook(self._leave, always_call=True))

    def _enter(self, module: nn.Module, args: Any) -> None:
        self.lock.acquire()
        self._depth.n = getattr(self._depth, "n", 0) + 1

    def _leave(self, module: nn.Module, args: Any, output: Any) -> None:
        # A hook registered during a call has its post hook run without the pre hook.
        if getattr(self._depth, "n", 0) > 0:
            self._depth.n -= 1
            self.lock.release()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __deepcopy__(self, memo: dict[int, Any]) -> PolicyGate:
        # torchrl deep-copies the policy for a device cast after connect: the copy
        # (the model then really used) shares this gate.
        return self

