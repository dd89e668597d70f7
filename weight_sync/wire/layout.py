"""Where every weight lives in the flat wire buffer.

A :class:`BufferLayout` lists each leaf (name, shape, dtype) and its byte offset in one
contiguous ``uint8`` message. Both sides compute it from their own policy; the learner
publishes its layout at connect, and a collector whose layout differs is refused with
the list of differences before any weight moves.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from tensordict import TensorDictBase, is_non_tensor

from weight_sync.errors import InvalidWeightsError, LayoutMismatchError

__all__ = ["LayoutEntry", "BufferLayout", "HEADER_BYTES", "named_leaves"]

#: Bytes reserved at the start of every message for the header (magic, version, size).
HEADER_BYTES = 64
# Every leaf starts on a 64-byte boundary so that a uint8 slice can be viewed as any
# dtype (and stays cache-line aligned for the copies).
_ALIGN = 64


def _align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _is_container(value: Any) -> bool:
    return isinstance(value, TensorDictBase) and not is_non_tensor(value)


# torch.compile wraps a module as `_orig_mod`: a compiled policy and an uncompiled one
# hold the same weights under names that differ only by these segments.
_COMPILED = re.compile(r"(?:^|(?<=\.))_orig_mod\.")


def _uncompiled(name: str) -> str:
    return _COMPILED.sub("", name) if "_orig_mod." in name else name


def named_leaves(weights: Any) -> dict[str, torch.Tensor]:
    """Return the tensors to sync, by dotted name, sorted by name.

    Accepts an ``nn.Module`` (its parameters and buffers, tied tensors once), a
    TensorDict (nested keys joined by ``"."``) or a mapping of name to tensor
    (a ``state_dict``). The returned tensors are the live objects, not copies. The
    ``_orig_mod.`` segments of a ``torch.compile``'d module are left out of the names,
    so a compiled policy and an uncompiled one have the same layout.

    Raises:
        InvalidWeightsError: empty weights, a non-tensor value, a sparse tensor, a
            name that is not a string, or two keys of a TensorDict with the same
            dotted name (``"a.b"`` and ``("a", "b")``).
    """
    leaves: dict[str, torch.Tensor] = {}
    if isinstance(weights, torch.nn.Module):
        for name, param in weights.named_parameters():
            leaves[_uncompiled(name)] = param
        for name, buf in weights.named_buffers():
            if buf is not None:
                leaves[_uncompiled(name)] = buf
    elif isinstance(weights, TensorDictBase):
        # items() without leaves_only also yields non-tensor data (strings...), which
        # leaves_only would silently skip: refuse it below instead of dropping it.
        firsts: dict[str, Any] = {}  # name -> the key it came from
        for key, value in weights.items(include_nested=True):
            name = _uncompiled(key if isinstance(key, str) else ".".join(key))
            if isinstance(value, torch.Tensor) or not _is_container(value):
                if name in leaves:  # "a.b" next to ("a", "b"): one would never sync
                    raise InvalidWeightsError(
                        f"weights {firsts[name]!r} and {key!r} both have the name "
                        f"{name!r}: rename one of them")
                firsts[name] = key
                leaves[name] = value
    elif isinstance(weights, Mapping):
        odd = [key for key in weights if not isinstance(key, str)]
        if odd:
            raise InvalidWeightsError(f"weight names must be strings, got {odd[:5]!r}")
        leaves = {_uncompiled(k) if isinstance(k, str) else k: v for k, v in weights.items()}
    else:
        raise InvalidWeightsError(
            f"weights must be an nn.Module, a TensorDict or a state_dict, got {type(weights)!r}"
        )
    if not leaves:
        raise InvalidWeightsError("weights are empty: there is nothing to sync")
    for name, tensor in leaves.items():
        if not isinstance(tensor, torch.Tensor):
            raise InvalidWeightsError(f"weight {name!r} is a {type(tensor)!r}, not a tensor")
        if tensor.layout != torch.strided:
            raise InvalidWeightsError(f"weight {name!r} has layout {tensor.layout}; only dense")
    return dict(sorted(leaves.items()))


@dataclass(frozen=True)
class LayoutEntry:
    """One leaf of the message: its name, shape, dtype and byte offset."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int
    nbytes: int


@dataclass(frozen=True)
class BufferLayout:
    """The byte layout of the flat message that carries one version of the weights.

    Attributes:
        entries: the leaves in wire order (sorted by name).
        nbytes: total message size, header included.
    """

    entries: tuple[LayoutEntry, ...]
    nbytes: int

    @classmethod
    def from_weights(cls, weights: Any) -> BufferLayout:
        """Compute the layout of an ``nn.Module``, TensorDict or state_dict."""
        return cls.from_tensors(named_leaves(weights))

    @classmethod
    def from_tensors(cls, leaves: Mapping[str, torch.Tensor]) -> BufferLayout:
        return cls._place((name, tuple(t.shape), t.dtype) for name, t in leaves.items())

    @classmethod
    def _place(cls, leaves: Iterable[tuple[str, tuple[int, ...], torch.dtype]]) -> BufferLayout:
        entries = []
        offset = HEADER_BYTES
        for name, shape, dtype in leaves:
            nbytes = math.prod(shape) * dtype.itemsize
            entries.append(LayoutEntry(name, shape, dtype, offset, nbytes))
            offset = _align(offset + nbytes)
        return cls(tuple(entries), offset)

    def on_wire(self, wire_dtype: torch.dtype | None) -> BufferLayout:
        """The layout of the message when ``float32`` leaves travel as ``wire_dtype``
        (other leaves unchanged); this layout itself for ``None``."""
        if wire_dtype is None:
            return self
        return self._place((e.name, e.shape, wire_dtype if e.dtype == torch.float32
                            else e.dtype) for e in self.entries)

    def describe(self) -> list[list[Any]]:
        """A JSON-able description (name, shape, dtype): what the handshake compares."""
        return [[e.name, list(e.shape), str(e.dtype).removeprefix("torch.")] for e in self.entries]

    def to_json(self) -> str:
        return json.dumps(self.describe(), separators=(",", ":"))

    @functools.cached_property
    def digest(self) -> str:
        """A short hash of :meth:`describe`; equal digests mean compatible layouts
        (computed once: every message header carries it)."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    def differences(
        self, other_json: str, *, mine: str = "collector", theirs: str = "learner"
    ) -> list[str]:
        """List, one line each, how this layout differs from another's ``to_json()``."""
        own = {name: (shape, dtype) for name, shape, dtype in self.describe()}
        other = {name: (shape, dtype) for name, shape, dtype in json.loads(other_json)}
        lines = []
        for name in sorted(own.keys() - other.keys()):
            lines.append(f"{name}: only on the {mine}")
        for name in sorted(other.keys() - own.keys()):
            lines.append(f"{name}: missing on the {mine} (the {theirs} has it)")
        for name in sorted(own.keys() & other.keys()):
            (s1, d1), (s2, d2) = own[name], other[name]
            if s1 != s2:
                lines.append(
                    f"{name}: shape {tuple(s1)} on the {mine}, {tuple(s2)} on the {theirs}")
            if d1 != d2:
                lines.append(f"{name}: dtype {d1} on the {mine}, {d2} on the {theirs}")
        return lines

    def check_compatible(self, other_json: str, *, who: str, mine: str = "collector") -> None:
        """Raise :class:`LayoutMismatchError` listing the differences, if any."""
        diffs = self.differences(other_json, mine=mine)
        if diffs:
            shown = "\n  ".join(diffs[:50])
            more = f"\n  ... and {len(diffs) - 50} more" if len(diffs) > 50 else ""
            raise LayoutMismatchError(
                f"{who}: weights differ from the learner's in {len(diffs)} place(s):\n  "
                f"{shown}{more}",
                diffs,
            )

    def views(self, buffer: torch.Tensor) -> list[torch.Tensor]:
        """Typed, shaped views of each leaf inside a flat ``uint8`` buffer (no copy)."""
        if buffer.dtype != torch.uint8 or buffer.numel() != self.nbytes:
            raise InvalidWeightsError(
                f"buffer must be uint8 of {self.nbytes} bytes, got {buffer.dtype} of "
                f"{buffer.numel()}"
            )
        return [
            buffer[e.offset : e.offset + e.nbytes].view(e.dtype).view(e.shape)
            for e in self.entries
        ]
