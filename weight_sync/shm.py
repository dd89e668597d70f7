"""Shared-memory segments for same-host collectors.

With ``transport="shm"`` the learner's snapshot buffers live in named POSIX
shared-memory segments. A collector on the learner's host is told the segment of each
message instead of receiving it over a socket, and copies it into its staging buffer
(one memcpy, where gloo over loopback costs a socket write plus a read). The segment
goes back to the learner's pool once that collector acked, as any snapshot does.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
from multiprocessing import shared_memory
from typing import Any

import torch

__all__ = ["create_segment", "SegmentReader"]

log = logging.getLogger(__name__)

# Where Linux exposes POSIX shared memory as files.
_SHM_DIR = "/dev/shm"


def create_segment(nbytes: int) -> tuple[shared_memory.SharedMemory, torch.Tensor]:
    """A new segment of ``nbytes`` and a ``uint8`` tensor over it (the creator unlinks
    it; its resource tracker also does if the creator dies)."""
    segment = shared_memory.SharedMemory(create=True, size=max(nbytes, 1))
    return segment, torch.frombuffer(segment.buf, dtype=torch.uint8, count=nbytes)


def _attach(name: str, nbytes: int) -> tuple[Any, torch.Tensor]:
    """Map segment ``name`` without registering it with this process's resource
    tracker: on Python < 3.13 ``SharedMemory(name=...)`` does, and the tracker would
    then unlink the learner's segment when this collector exits (or, shared with a
    spawning learner, forget the learner's own registration)."""
    path = os.path.join(_SHM_DIR, name.lstrip("/"))
    with open(path, "r+b") as file:
        mapping = mmap.mmap(file.fileno(), 0)
    return mapping, torch.frombuffer(mapping, dtype=torch.uint8, count=nbytes)


class SegmentReader:
    """A collector's view of the learner's segments, attached on first use."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        self._open: dict[str, tuple[Any, torch.Tensor]] = {}

    def copy_into(self, name: str, buffer: torch.Tensor) -> None:
        """Copy the message in segment ``name`` into ``buffer``.

        Raises:
            FileNotFoundError: no such segment (the learner is gone).
        """
        entry = self._open.get(name)
        if entry is None:
            entry = _attach(name, self.nbytes)
            self._open[name] = entry
        buffer.copy_(entry[1])

    def close(self) -> None:
        for mapping, _tensor in self._open.values():
            with contextlib.suppress(BufferError):  # a view may still be alive
                mapping.close()
        self._open.clear()
