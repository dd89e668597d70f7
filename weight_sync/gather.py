"""Packing a message of many small leaves in a few calls: :class:`Gather`.

``torch._foreach_copy_`` copies leaf by leaf on the CPU, about 0.9 µs a leaf here: a
298-leaf 100K-parameter policy took 0.28 ms to pack, more than its bytes take to
travel. One ``torch.cat`` into the message writes a whole run of same-dtype leaves,
the zero padding between them included, at about 0.25 µs a leaf (0.15 ms for that
policy). A gather is built once per set of source tensors and reused for as long as
every source keeps its storage.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from weight_sync.layout import BufferLayout

__all__ = ["Gather", "storage_key"]


@dataclass(frozen=True)
class _Run:
    """Leaves of one dtype laid out back to back but for padding: one ``cat``."""

    dtype: torch.dtype
    start: int  # byte offset of its first leaf
    end: int  # byte offset past its last leaf
    inputs: tuple[torch.Tensor, ...]  # flat source views and zero pads, in order


class Gather:
    """Packs ``sources`` into messages of ``layout`` with one ``torch.cat`` per run of
    same-dtype leaves. Build it with :meth:`build`; it reads the sources' storage, so a
    source whose storage changed (``param.data = ...``: its :func:`storage_key`
    changed) needs a new one."""

    def __init__(self, runs: list[_Run]) -> None:
        self._runs = runs
        self._outputs: dict[int, list[torch.Tensor]] = {}  # buffer data_ptr -> per run

    @classmethod
    def build(cls, layout: BufferLayout, sources: Sequence[torch.Tensor],
              device: torch.device) -> Gather | None:
        """A gather for ``sources``, or ``None`` when some leaf cannot be gathered
        (not contiguous, not on ``device``, or converted on the way: a wire dtype)."""
        if len(sources) != len(layout.entries):
            return None
        runs: list[_Run] = []
        inputs: list[torch.Tensor] = []
        start = end = 0
        dtype: torch.dtype | None = None
        for entry, source in zip(layout.entries, sources, strict=True):
            if (source.dtype != entry.dtype or not source.is_contiguous()
                    or source.device != device):
                return None
            size = source.element_size()
            gap = entry.offset - end
            if dtype != entry.dtype or gap % size:
                if dtype is not None:
                    runs.append(_Run(dtype, start, end, tuple(inputs)))
                inputs, start, dtype = [], entry.offset, entry.dtype
            elif gap:
                inputs.append(torch.zeros(gap // size, dtype=entry.dtype, device=device))
            inputs.append(source.detach().view(-1))
            end = entry.offset + entry.nbytes
        if dtype is not None:
            runs.append(_Run(dtype, start, end, tuple(inputs)))
        return cls(runs)

    def into(self, buffer: torch.Tensor) -> None:
        """Pack the sources into the flat ``uint8`` message ``buffer``."""
        outputs = self._outputs.get(buffer.data_ptr())
        if outputs is None:
            outputs = self._outputs[buffer.data_ptr()] = [
                buffer[run.start:run.end].view(run.dtype) for run in self._runs]
        with torch.no_grad():
            for run, out in zip(self._runs, outputs, strict=True):
                torch.cat(run.inputs, out=out)


def storage_key(sources: Sequence[torch.Tensor]) -> tuple[int, ...]:
    """What a gather of ``sources`` depends on: their addresses (a gather's views keep
    the storage it read alive, so an equal address is the same storage)."""
    return tuple(map(torch.Tensor.data_ptr, sources))
