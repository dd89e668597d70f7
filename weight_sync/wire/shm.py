"""POSIX shared memory: the learner's message segments, a collector's mappings of them,
and the token that proves a collector shares the learner's ``/dev/shm``.

A collector can use the learner's segments only if it sees the same ``/dev/shm``: the
same hostname is not enough (a container or another mount namespace may share the
hostname but not the memory). The learner writes a random token into a file of its
``/dev/shm`` and publishes only the file's name; a collector that can read the token
back proves it shares the memory.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import secrets
from multiprocessing import shared_memory

import torch

__all__ = ["SHM_DIR", "create_segment", "SegmentReader", "ShmToken", "read_token"]

log = logging.getLogger(__name__)

#: Where Linux exposes POSIX shared memory as files.
SHM_DIR = "/dev/shm"


def create_segment(nbytes: int) -> tuple[shared_memory.SharedMemory, torch.Tensor]:
    """A new segment of ``nbytes`` and a ``uint8`` tensor over it (the creator unlinks
    it; its resource tracker also does if the creator dies)."""
    segment = shared_memory.SharedMemory(create=True, size=max(nbytes, 1))
    return segment, torch.frombuffer(segment.buf, dtype=torch.uint8, count=nbytes)


def _path(name: str) -> str:
    return os.path.join(SHM_DIR, name.lstrip("/"))


class SegmentReader:
    """A collector's mappings of the learner's segments, one per segment, made on first
    use and kept (the learner's pool reuses a bounded set of segments).

    Mappings are private (copy-on-write): reads share the learner's pages; a write (a
    policy updating its own weights) makes a private page and never reaches the
    learner. Before a mapping serves a new message its private pages are dropped
    (``MADV_DONTNEED``: the next reads come from the segment again), so they never
    hide what the learner wrote since. Segments are mapped directly, not with
    ``SharedMemory(name=...)``, which on Python < 3.13 registers them with this
    process's resource tracker, which would then unlink the learner's segments when
    this collector exits.
    """

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        self._maps: dict[str, mmap.mmap] = {}
        self._views: dict[str, torch.Tensor] = {}

    def view(self, name: str) -> torch.Tensor:
        """A ``uint8`` tensor over segment ``name``, as the learner last wrote it (the
        same tensor every time for the same segment). Call it only when the collector
        no longer uses that segment's previous message.

        Raises:
            FileNotFoundError: no such segment (the learner is gone).
        """
        tensor = self._views.get(name)
        if tensor is not None:
            self._maps[name].madvise(mmap.MADV_DONTNEED)
            return tensor
        with open(_path(name), "r+b") as file:
            mapping = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY)
        self._maps[name] = mapping
        tensor = self._views[name] = torch.frombuffer(mapping, dtype=torch.uint8,
                                                      count=self.nbytes)
        return tensor

    def close(self) -> None:
        """Unmap every segment; idempotent. Callers must hold no tensor over one by
        then (a mapping still in use is unmapped when its last user goes)."""
        self._views.clear()
        for name, mapping in self._maps.items():
            try:
                mapping.close()
            except BufferError:
                log.warning("segment %s still in use at close; unmapped when released", name)
        self._maps.clear()


class ShmToken:
    """A random token in a file of this host's ``/dev/shm`` (learner side)."""

    def __init__(self) -> None:
        self.name = f"ws-token-{os.getpid()}-{secrets.token_hex(8)}"
        self.value = secrets.token_hex(16)
        fd = os.open(_path(self.name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as file:
            file.write(self.value)

    def matches(self, value: str | None) -> bool:
        return value is not None and secrets.compare_digest(value, self.value)

    def close(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(_path(self.name))


def read_token(name: str) -> str | None:
    """The token in ``/dev/shm/<name>`` as this process sees it, ``None`` if absent."""
    if not name or "/" in name:
        return None
    try:
        with open(_path(name)) as file:
            return file.read(64)
    except OSError:
        return None
