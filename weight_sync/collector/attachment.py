"""One learner a collector is (or was) attached to, and the background loops that watch
it: :class:`Attachment`, :class:`Item` (what those threads hand the collector),
:func:`heartbeat`, :func:`watch_learner`. The receiver (:mod:`weight_sync.collector.receiver`)
holds one attachment per learner; re-attaching to a restarted learner makes a new one
and leaves the old one's threads to end."""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field

import torch

from weight_sync.collector.receiver_link import ReceiverLink
from weight_sync.control.channel import Control
from weight_sync.control.liveness import LearnerWatch
from weight_sync.errors import PeerGone, WeightSyncError

__all__ = ["Attachment", "Item", "heartbeat", "watch_learner"]


@dataclass(eq=False)
class Attachment:
    """One learner this receiver is (or was) attached to: its link and the threads that
    serve it. ``stop`` ends them; ``lost`` means no store call may reach that learner
    (frozen or gone: the call would never return)."""

    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)
    link: ReceiverLink | None = None
    watch: LearnerWatch | None = None
    nonce: str = ""  # the learner's
    transport: str = ""  # the one the learner placed this collector on
    lost: bool = False
    fresh: bool = True  # its first message is not applied yet
    applied: int | None = None  # a version applied, for its listener to ack
    acked: threading.Event = field(default_factory=lambda: _set(threading.Event()))
    """Clear while a version applied waits for its ack."""
    deadline: float = math.inf  # a reattach: when receive_weights gives up on it


def _set(event: threading.Event) -> threading.Event:
    event.set()
    return event


@dataclass(frozen=True, eq=False)
class Item:
    """What the background threads hand the collector: a received version and the
    buffer holding it, or the error that ended an attachment's stream."""

    attachment: Attachment
    version: int = -1
    data: torch.Tensor | None = None
    error: WeightSyncError | None = None


def heartbeat(att: Attachment, control: Control, collector_id: int, incarnation: int,
              every_s: float) -> None:
    """Beat now and every ``every_s``, so the learner can tell a live but slow collector
    from a vanished one; read the learner's beat meanwhile (into ``att.watch``).

    Raises:
        PeerGone: the learner's store went away (``att.lost`` is set first).
    """
    assert att.watch is not None
    try:
        while True:
            try:
                control.beat(collector_id, incarnation)
                att.watch.saw(control.learner_beats())
            except PeerGone as exc:
                # The listener may be stuck in a transfer the dead learner cut short
                # (gloo only notices at its timeout): report it now instead.
                att.lost = True
                raise PeerGone(f"collector {collector_id}: the learner's store went away "
                               f"(heartbeat failed): {exc}") from exc
            if att.stop.wait(every_s):
                return
    finally:
        control.close()


def watch_learner(att: Attachment, every_s: float) -> None:
    """Every ``every_s``, check the learner's beat moved lately; this loop makes no store
    call, so a frozen learner cannot hold it up.

    Raises:
        PeerGone: the learner's beat stood still too long (``att.lost`` is set first).
    """
    assert att.watch is not None
    while not att.stop.wait(every_s):
        try:
            att.watch.check()
        except PeerGone:
            att.lost = True
            raise
