"""Re-attaching a collector to a learner started anew at the same address.

Once a collector lost its learner (``ReceiverConfig.reattach_timeout > 0``), its
receiver waits here for a store to answer at the learner's address again, then joins
it as it joined the first one (:mod:`weight_sync.handshake`). What tells a new learner
from the old one is its nonce (every learner draws a fresh one): each new learner
starts a new *epoch* of the collector's versions, and :func:`check_first_version` says
whether its first version may follow the one applied.
"""

from __future__ import annotations

import socket
import threading
import time

from weight_sync.config import ConnectionInfo
from weight_sync.errors import PeerGone, ProtocolError

__all__ = ["wait_for_store", "check_first_version", "not_taken_back"]

# A learner that is not listening yet refuses the connection at once; try again after
# this long (there is nothing to wait on but the port itself).
_PROBE_INTERVAL_S = 0.2
# Bound on one connection attempt (a host that drops packets instead of refusing).
_PROBE_TIMEOUT_S = 1.0


def wait_for_store(info: ConnectionInfo, deadline: float, stop: threading.Event,
                   who: str, cause: BaseException) -> bool:
    """Block until something listens at the learner's address again.

    Probes with a plain TCP connection (closed at once) rather than a store client,
    whose own retries log a stack trace per failed attempt.

    Args:
        info: the learner's address and stream.
        deadline: ``time.monotonic()`` value to give up at.
        stop: set when the receiver closes meanwhile.
        who: the collector, for messages.
        cause: the loss that started the wait, named in the error.

    Returns:
        ``True`` once the address accepts a connection, ``False`` if ``stop`` was set.

    Raises:
        PeerGone: nothing answered before ``deadline``; names the address, the stream
            and how long it waited.
    """
    start = time.monotonic()
    while not stop.is_set():
        left = deadline - time.monotonic()
        if left <= 0:
            raise PeerGone(f"{who}: no learner came back at {info.host}:{info.port} (stream "
                           f"{info.name!r}) after waiting {time.monotonic() - start:.1f}s "
                           f"(reattach_timeout); the learner was lost: {cause}") from cause
        try:
            with socket.create_connection((info.host, info.port),
                                          timeout=min(left, _PROBE_TIMEOUT_S)):
                return True
        except OSError:
            stop.wait(min(_PROBE_INTERVAL_S, max(deadline - time.monotonic(), 0)))
    return False


def check_first_version(who: str, address: str, version: int, applied: int,
                        accept_rewind: bool) -> None:
    """The rule for a re-attached learner's first version.

    A version at least ``applied`` is accepted (the new learner resumed where the old
    one was, or later); a lower one only with ``accept_rewind``.

    Raises:
        ProtocolError: ``version < applied`` and not ``accept_rewind``.
    """
    if version < applied and not accept_rewind:
        raise ProtocolError(f"{who}: the learner now at {address} starts at version {version}, "
                            f"older than version {applied} applied here (resumed from an "
                            f"older checkpoint?); refused with accept_rewind=False, nothing "
                            f"applied")


def not_taken_back(who: str, info: ConnectionInfo, reattach_timeout: float,
                   why: str) -> PeerGone:
    """The error of a reattach that found something at the learner's address but no
    learner that took the collector back (``why``)."""
    return PeerGone(f"{who}: no learner took this collector back at {info.host}:{info.port} "
                    f"(stream {info.name!r}) within reattach_timeout {reattach_timeout}s"
                    f"{why}")
