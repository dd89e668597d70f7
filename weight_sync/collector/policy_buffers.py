"""A collector's message buffers and the switch of its policy between them:
:class:`PolicyBuffers`.

What an apply updates (every form, every path, whatever ``wire_dtype``):

* an ``nn.Module``: the tensors the module holds *at the apply* (also ones replaced
  since construction: ``load_state_dict(..., assign=True)``, a forward that rebinds a
  buffer), switched onto the message in one step (no copy) when the message is in
  their dtypes and on their device, else copied into;
* a TensorDict or a ``state_dict``: the tensors given at construction, written in place
  (copied into), so that whatever shares their storage (the module whose
  ``state_dict()`` or ``TensorDict(state_dict())`` they are) holds the new values.

Tensors on the meta device are refused at construction (nothing to write into)."""

from __future__ import annotations

from typing import Any

import torch

from weight_sync.errors import InvalidWeightsError
from weight_sync.wire.layout import BufferLayout
from weight_sync.wire.live import LiveLeaves
from weight_sync.wire.packing import copy_in, swap_in

__all__ = ["PolicyBuffers"]


class PolicyBuffers:
    """The buffers messages are received into, and the policy's tensors switched onto
    one of them in one step (or copied from it).

    Args:
        policy: the collector's ``nn.Module``, TensorDict or ``state_dict``.
        layout: the policy's layout; ``wire_layout``: the messages' (they differ with a
            narrower wire dtype).
        who: names the collector in errors.

    Raises:
        InvalidWeightsError: a tensor on the meta device, or one whose elements share
            memory (stride 0, from ``expand()``): received values cannot land in it.
    """

    def __init__(self, policy: Any, layout: BufferLayout, wire_layout: BufferLayout,
                 who: str) -> None:
        self._leaves = LiveLeaves(policy, layout, who)
        for entry, tensor in zip(layout.entries, self._leaves.current(), strict=True):
            if any(stride == 0 and size > 1
                   for size, stride in zip(tensor.shape, tensor.stride(), strict=True)):
                raise InvalidWeightsError(
                    f"{who}: weight {entry.name!r} has elements sharing memory "
                    f"(stride {tensor.stride()}, e.g. from expand()): received values "
                    f"cannot be written into it; give it its own memory (.clone())")
        self.layout = layout
        self.wire_layout = wire_layout
        self.held: torch.Tensor | None = None
        """The message last applied (swapped in or copied), which a changed-only
        message is composed from."""
        self._device = torch.device("cpu")
        self._private: list[torch.Tensor] = []  # buffers a copying transport fills
        self._active: torch.Tensor | None = None  # the message the policy points at
        self._views: dict[int, list[torch.Tensor]] = {}  # data_ptr -> per-leaf views
        self._can_swap = self._leaves.followed
        self._placed: list[torch.Tensor] | None = None  # the targets _can_swap was for

    @property
    def targets(self) -> list[torch.Tensor]:
        """The policy's tensors now, in the layout's order."""
        return self._leaves.current()

    def place(self, device: torch.device) -> None:
        """Messages arrive on ``device`` (the link's): swap onto them when they are in
        the policy's own dtypes and on its device, else copy each one in."""
        self._device = device
        self._placed = None

    def staging(self, lends: bool) -> torch.Tensor | None:
        """The private buffer the next message goes into (``None`` when the transport
        lends its messages): one the policy does not point at, made on first use."""
        if lends:
            return None
        free = [b for b in self._private if b is not self._active]
        if free:
            return free[0]
        buffer = torch.empty(self.wire_layout.nbytes, dtype=torch.uint8, device=self._device)
        self._private.append(buffer)
        return buffer

    def apply(self, data: torch.Tensor) -> None:
        """Switch the policy to ``data`` in one step (or copy it in, when the policy's
        tensors live on another device or in other dtypes than the messages)."""
        views = self._views_of(data)
        targets = self._leaves.current()
        if targets is not self._placed:  # first apply, or the module's were replaced
            self._placed = targets
            self._can_swap = (self._leaves.followed and self.wire_layout == self.layout
                              and all(t.device == self._device for t in targets))
        if self._can_swap:
            swap_in(targets, views)
            self._active = data
        else:
            copy_in(targets, views)
        self.held = data

    def keep_private(self) -> None:
        """Move the policy off a lent message (the learner's memory) onto a private
        copy, so it stays valid once the link is gone."""
        active = self._active
        if active is None or any(active is b for b in self._private):
            return
        own = active.clone()
        self._private = [own]
        self._views.clear()
        if self._placed is not None:  # the tensors switched onto the lent message
            swap_in(self._placed, self._views_of(own))
        self._active = self.held = own

    def forget_views(self) -> None:
        self._views.clear()

    def _views_of(self, data: torch.Tensor) -> list[torch.Tensor]:
        # Per-leaf views made once per buffer or segment (both are few and reused): a
        # 300-leaf policy's views cost more to build than a small message to receive.
        key = data.data_ptr()
        views = self._views.get(key)
        if views is None:
            views = self._views[key] = self.wire_layout.views(data)
        return views
