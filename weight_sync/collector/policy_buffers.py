"""A collector's message buffers and the switch of its policy between them:
:class:`PolicyBuffers`."""

from __future__ import annotations

import torch

from weight_sync.wire.layout import BufferLayout
from weight_sync.wire.packing import copy_in, swap_in

__all__ = ["PolicyBuffers"]


class PolicyBuffers:
    """The buffers messages are received into, and the policy's tensors switched onto
    one of them in one step (or copied from it).

    Args:
        targets: the policy's tensors, in the layout's order.
        layout: the policy's layout; ``wire_layout``: the messages' (they differ with a
            narrower wire dtype).
    """

    def __init__(self, targets: list[torch.Tensor], layout: BufferLayout,
                 wire_layout: BufferLayout) -> None:
        self.targets = targets
        self.layout = layout
        self.wire_layout = wire_layout
        self.held: torch.Tensor | None = None
        """The message last applied (swapped in or copied), which a changed-only
        message is composed from."""
        self._device = torch.device("cpu")
        self._private: list[torch.Tensor] = []  # buffers a copying transport fills
        self._active: torch.Tensor | None = None  # the message the policy points at
        self._views: dict[int, list[torch.Tensor]] = {}  # data_ptr -> per-leaf views
        self._can_swap = True

    def place(self, device: torch.device) -> None:
        """Messages arrive on ``device`` (the link's): swap onto them when they are in
        the policy's own dtypes and on its device, else copy each one in."""
        self._device = device
        self._can_swap = self.wire_layout == self.layout and all(
            t.device == device for t in self.targets)

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
        if self._can_swap:
            swap_in(self.targets, views)
            self._active = data
        else:
            copy_in(self.targets, views)
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
        self.apply(own)

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
