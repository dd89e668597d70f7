"""POSIX shared memory: the learner's message segments, a collector's mappings of them,
and the token that proves a collector shares the learner's ``/dev/shm``.

A collector can use the learner's segments only if it sees the same ``/dev/shm``: the
same hostname is not enough (a container or another mount namespace may share the
hostname but not the memory). The learner writes a random token into a file of its
``/dev/shm`` and publishes only the file's name; a collector that can read the token
back proves it shares the memory.

``/dev/shm`` is often small (64 MB in Docker and many CI runners), and a tmpfs claims a
page only when it is first written: a segment larger than the room left is created
without complaint and kills its writer with ``SIGBUS`` later. Every segment made here is
therefore allocated in full at creation (``posix_fallocate``): a full ``/dev/shm`` is a
:class:`~weight_sync.errors.SharedMemoryFull` then, never a signal.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
import re
import secrets
from multiprocessing import shared_memory

import torch

from weight_sync.errors import SharedMemoryFull

__all__ = ["SHM_DIR", "create_segment", "shm_room", "SegmentReader", "ShmToken",
           "sweep_dead_owners", "read_token"]

log = logging.getLogger(__name__)

#: Where Linux exposes POSIX shared memory as files.
SHM_DIR = "/dev/shm"


def create_segment(nbytes: int) -> tuple[shared_memory.SharedMemory, torch.Tensor]:
    """A new segment of ``nbytes``, its pages allocated, and a ``uint8`` tensor over it
    (the creator unlinks it; its resource tracker also does if the creator dies).

    Raises:
        SharedMemoryFull: ``/dev/shm`` has not ``nbytes`` left (nothing is left behind).
    """
    segment = _allocated(nbytes, _owned_name("seg"))
    return segment, torch.frombuffer(segment.buf, dtype=torch.uint8, count=nbytes)


def _owned_name(kind: str) -> str:
    """A fresh name for a file of ``/dev/shm`` that says which process owns it: its pid
    namespace, pid and start time (what :func:`sweep_dead_owners` reads back); the
    first one made here also removes those of dead processes."""
    global _swept
    tag = _process_tag(os.getpid())
    if tag is not None and not _swept:
        _swept = True
        sweep_dead_owners()
    return f"ws-{kind}-{tag or f'0-{os.getpid()}-0'}-{secrets.token_hex(8)}"


_swept = False


def _allocated(nbytes: int, name: str | None = None) -> shared_memory.SharedMemory:
    """A new segment whose ``nbytes`` are allocated (``SharedMemoryFull`` if they
    cannot be)."""
    size = max(nbytes, 1)
    try:
        segment = shared_memory.SharedMemory(name, create=True, size=size)
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.ENOMEM):
            raise
        raise _full(nbytes, exc) from exc
    try:
        fd = os.open(_path(segment.name), os.O_RDWR)
        try:
            os.posix_fallocate(fd, 0, size)
        finally:
            os.close(fd)
    except OSError as exc:
        segment.close()
        segment.unlink()
        if exc.errno not in (errno.ENOSPC, errno.ENOMEM, errno.EFBIG):
            raise
        raise _full(nbytes, exc) from exc
    return segment


def _full(nbytes: int, exc: OSError) -> SharedMemoryFull:
    return SharedMemoryFull(f"{SHM_DIR} has no room for a segment of {nbytes} bytes "
                            f"({shm_room()} bytes free): {exc.strerror}")


def shm_room() -> int:
    """Bytes this process may still allocate in ``/dev/shm`` (0 if it has none)."""
    try:
        stat = os.statvfs(SHM_DIR)
    except OSError:
        return 0
    return stat.f_bavail * stat.f_frsize


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
    """A random token in a file of this host's ``/dev/shm`` (learner side).

    The file must not outlive the learner, however it ends. It is a shared-memory
    segment, so the learner's resource tracker (a process of its own) unlinks it if the
    learner is killed (``SIGKILL``, ``SIGTERM``, ``SIGBUS``); and its name carries the
    learner's pid namespace, pid and start time, so that the next learner on the host
    removes the token of one whose tracker died with it (:func:`sweep_dead_owners`).
    """

    def __init__(self) -> None:
        sweep_dead_owners()
        self.value = secrets.token_hex(16)
        self.name = _owned_name("token")
        self._segment = _allocated(len(self.value), self.name)
        buf = self._segment.buf
        assert buf is not None  # open until close()
        buf[:len(self.value)] = self.value.encode()

    def matches(self, value: str | None) -> bool:
        return value is not None and secrets.compare_digest(value, self.value)

    def close(self) -> None:
        self._segment.close()
        with contextlib.suppress(FileNotFoundError):
            self._segment.unlink()


_OWNED_NAME = re.compile(r"ws-(?:token|seg)-(\d+)-(\d+)-(\d+)-[0-9a-f]+")


def _process_tag(pid: int) -> str | None:
    """``<pid namespace inode>-<pid>-<start time>`` of a live process, ``None`` if it is
    gone (or this cannot be read)."""
    try:
        namespace = os.readlink(f"/proc/{pid}/ns/pid")
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    inode = namespace.rpartition("[")[2].rstrip("]")
    # fields[0] is the stat file's 3rd field; the start time (in clock ticks) is its 22nd.
    return f"{inode}-{pid}-{fields[19]}" if fields[0] != "Z" else None


def sweep_dead_owners() -> int:
    """Remove the files of ``/dev/shm`` (tokens, segments) made here by processes of
    this pid namespace that are gone, however they ended (a ``SIGKILL`` of a process
    group takes its resource tracker with it); those of another namespace, where a pid
    or a start time means nothing, are left alone. Returns how many were removed."""
    tag = _process_tag(os.getpid())
    if tag is None:
        return 0
    namespace = tag.split("-")[0]
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return 0
    removed = 0
    for name in names:
        match = _OWNED_NAME.fullmatch(name)
        if match is None or match[1] != namespace:
            continue
        if _process_tag(int(match[2])) != "-".join(match.group(1, 2, 3)):
            with contextlib.suppress(OSError):
                os.unlink(_path(name))
                removed += 1
                log.info("removed %s of %s: its process is gone", name, SHM_DIR)
    return removed


def read_token(name: str) -> str | None:
    """The token in ``/dev/shm/<name>`` as this process sees it, ``None`` if absent."""
    if not name or "/" in name:
        return None
    try:
        with open(_path(name)) as file:
            return file.read(64)
    except OSError:
        return None
