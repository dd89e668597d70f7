"""The hashes that protect messages: fast ones when their optional libraries are
installed (the ``fast`` extra), the standard library's otherwise.

=========  =====================  ==========================  ====================
use        with ``fast``          without                     measured here
=========  =====================  ==========================  ====================
checksum   XXH3-64 (``xxhash``)   CRC-32 (``zlib``)           14 vs 2.0 GB/s
digest     BLAKE3 (``blake3``)    SHA-256 (``hashlib``)       6.0 vs 1.1 GB/s
=========  =====================  ==========================  ====================

The learner uses the fastest it has and names it in the message (the header's checksum
kind, the digest's ``"<algorithm>:"`` prefix), so both ends always compute the same
one. A collector that lacks the library a learner used cannot check its messages and
says so (:class:`~weight_sync.errors.ConfigError` naming the extra) instead of refusing
them as corrupt.
"""

from __future__ import annotations

import hashlib
import zlib
from types import ModuleType

from weight_sync.errors import ConfigError

__all__ = ["NO_CHECKSUM", "XXH3_64", "CRC32", "Checksum", "checksum_kind", "checksum",
           "digest", "same_digest"]

NO_CHECKSUM, XXH3_64, CRC32 = 0, 1, 2


def _optional(name: str) -> ModuleType | None:
    try:
        return __import__(name)
    except ImportError:
        return None


_xxhash = _optional("xxhash")
_blake3 = _optional("blake3")
_MISSING = "install weight-sync's 'fast' extra (pip install 'weight-sync[fast]')"


def checksum_kind() -> int:
    """The checksum this process stamps: XXH3-64 if ``xxhash`` is installed, else CRC-32."""
    return XXH3_64 if _xxhash is not None else CRC32


def checksum(data: memoryview, kind: int) -> int:
    """Checksum ``kind`` of ``data``, as the signed 64-bit word a header stores.

    Raises:
        ConfigError: ``kind`` needs a library this process lacks.
        ValueError: an unknown kind.
    """
    running = Checksum(kind)
    running.update(data)
    return running.value()


class Checksum:
    """A checksum computed piece by piece, equal to :func:`checksum` of the pieces
    joined. :meth:`update` releases the GIL (``xxhash``'s hasher objects and
    ``zlib.crc32`` do; ``xxhash.xxh3_64_intdigest`` does not), so another thread may
    copy or receive the next piece meanwhile.

    Raises:
        ConfigError: ``kind`` needs a library this process lacks.
        ValueError: an unknown kind.
    """

    def __init__(self, kind: int) -> None:
        if kind == XXH3_64:
            if _xxhash is None:
                raise ConfigError(f"the learner checksums its messages with XXH3-64: "
                                  f"{_MISSING}")
            self._hasher = _xxhash.xxh3_64()
        elif kind != CRC32:
            raise ValueError(f"unknown checksum kind {kind}")
        self.kind = kind
        self._crc = 0

    def update(self, data: memoryview) -> None:
        if self.kind == XXH3_64:
            self._hasher.update(data)
        else:
            self._crc = zlib.crc32(data, self._crc)

    def value(self) -> int:
        """The signed 64-bit word of the bytes so far."""
        value = int(self._hasher.intdigest()) if self.kind == XXH3_64 else self._crc
        return value - (1 << 64) if value >= 1 << 63 else value


def digest(data: memoryview, like: str = "") -> str:
    """``"<algorithm>:<hex>"`` of ``data``: BLAKE3 if ``blake3`` is installed, else
    SHA-256; with ``like``, the algorithm that digest names.

    Raises:
        ConfigError: ``like`` names BLAKE3 and this process lacks it.
    """
    algorithm = like.partition(":")[0] if like else ("blake3" if _blake3 else "sha256")
    if algorithm == "blake3":
        if _blake3 is None:
            raise ConfigError(f"the learner digests its messages with BLAKE3: {_MISSING}")
        return "blake3:" + str(_blake3.blake3(data).hexdigest())
    return "sha256:" + hashlib.sha256(data).hexdigest()


def same_digest(data: memoryview, expected: str) -> bool:
    """Whether ``data`` has digest ``expected`` (computed with the algorithm it names)."""
    return digest(data, like=expected) == expected
