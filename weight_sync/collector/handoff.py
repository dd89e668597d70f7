"""The hand-off between a receiver's background threads and the collector's own thread:
:class:`HandOff`.

A listener thread per attachment receives each next message into staging, puts it in
one queue and waits until the collector applied it (so it never refills a buffer the
collector may still be switching to), then acks it: acks leave the collector's thread,
so a poll never waits on a store call (which a frozen or cut-off learner never
answers). Any exception in a background thread becomes the stream's error, put in the
same queue. Retiring an attachment stops its threads within bounded waits.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

from weight_sync.collector.attachment import Attachment, Item
from weight_sync.collector.policy_buffers import PolicyBuffers
from weight_sync.collector.receiver_link import ReceiverLink
from weight_sync.errors import WeightSyncError

__all__ = ["HandOff"]

log = logging.getLogger(__name__)

# Retiring waits this long for the background threads, before and after it closes the
# transport end, and for the goodbye to the learner.
_CLOSE_JOIN_S = 1.0
# While a received version waits for its apply, the listener looks this often whether
# the learner closed the stream (the learner waits for the goodbye for 2 s only).
_CLOSE_WATCH_S = 0.25


class HandOff:
    """The queue of received versions (and stream errors) and the threads that fill it.

    Args:
        who: the collector, for messages.
        tag: what its threads' names end with.
        buffers: the policy's buffers (staging is received into).
        idle_slice: how long one background wait lasts before it looks at its stop
            flag (``ReceiverConfig.idle_slice``).
    """

    def __init__(self, who: str, tag: str, buffers: PolicyBuffers,
                 idle_slice: float) -> None:
        self._who = who
        self._tag = tag
        self._buffers = buffers
        self._idle_slice = idle_slice
        self.inbox: queue.SimpleQueue[Item] = queue.SimpleQueue()
        """Received versions and stream errors, in order."""
        self.applied = threading.Event()
        """Set once the collector applied what was handed over (staging may be
        refilled), or to wake a listener that is stopping."""

    def start_thread(self, att: Attachment, role: str, body: Callable[[], None]) -> None:
        """Run ``body`` on a daemon thread of ``att``; what it raises ends the stream
        (handed over as the stream's error)."""
        def run() -> None:
            try:
                body()
            except BaseException as exc:  # any failure ends the stream, never silently
                if not isinstance(exc, WeightSyncError):
                    log.exception("%s: %s thread failed", self._who, role)
                    wrapped = WeightSyncError(f"{self._who}: the background {role} thread "
                                              f"failed: {exc!r}")
                    wrapped.__cause__ = exc
                    exc = wrapped
                att.stop.set()
                self.inbox.put(Item(att, error=exc))

        thread = threading.Thread(target=run, name=f"weight-sync-{role}-{self._tag}",
                                  daemon=True)
        att.threads.append(thread)
        thread.start()

    def put(self, item: Item) -> None:
        """Hand a received version over (then drop every reference to its buffer and
        :meth:`wait_applied`)."""
        self.applied.clear()
        self.inbox.put(item)

    def listen(self, att: Attachment) -> None:
        """Ack what was applied, then receive each next message, hand it over, wait for
        its apply and ack it, until ``att`` stops."""
        link = att.link
        assert link is not None
        try:
            self._ack_applied(att, link)
            while not att.stop.is_set():
                message = link.receive(self._buffers.staging(link.lends), self._idle_slice,
                                       self._buffers.held)
                if message is None:
                    continue
                self.put(Item(att, *message))
                del message  # no reference of this thread may outlive the apply
                if not self.wait_applied(att):
                    return
                self._ack_applied(att, link)
                # After the ack: the store serves one request at a time, and the ack must
                # not queue behind these deletes.
                link.collect_garbage()
        finally:
            att.acked.set()  # no ack comes from this thread any more: close waits for none

    @staticmethod
    def _ack_applied(att: Attachment, link: ReceiverLink) -> None:
        """Tell the learner the version the collector applied.

        Raises:
            PeerGone: the learner's store is gone (it ends the stream, or starts a
                reattach, as any loss of the learner).
        """
        version, att.applied = att.applied, None
        if version is not None:
            link.ack(version)
        att.acked.set()

    def wait_applied(self, att: Attachment) -> bool:
        """Wait until the collector applied the version handed over; False once
        ``att`` is stopped.

        Raises:
            ClosedError: the learner closed the stream meanwhile (the collector gets it
                after the version handed over, not a vanished store later).
        """
        assert att.link is not None
        while not self.applied.wait(min(self._idle_slice, _CLOSE_WATCH_S)):
            if att.stop.is_set():
                return False
            att.link.check_closed()
        return not att.stop.is_set()

    def retire(self, att: Attachment, *, reach: bool | None = None) -> None:
        """Stop an attachment's threads and release its link (without a store call
        once its learner is lost, unless ``reach``: it answered since)."""
        reach = not att.lost if reach is None else reach
        if reach:  # the learner sees the last version applied acked before the leave
            att.acked.wait(_CLOSE_JOIN_S)
        att.stop.set()
        self.applied.set()
        if att.link is not None:  # wakes the listener's wait
            link = att.link
            reach = reach and self._bounded_goodbye(lambda: link.stop(reach_learner=True))
            link.stop(reach_learner=False)
        # A listener inside a transfer (one the learner cut short, or will never finish
        # now that this collector left) is woken by closing the transport end; daemon
        # threads, so the waits stay short.
        self._join_threads(att, _CLOSE_JOIN_S)
        if att.link is not None:
            att.link.close(reach_learner=reach)
        self._join_threads(att, _CLOSE_JOIN_S)
        for thread in att.threads:
            if thread.is_alive() and thread is not threading.current_thread():
                log.warning("%s: %s still busy after close", self._who, thread.name)

    def _bounded_goodbye(self, goodbye: Callable[[], None]) -> bool:
        """Run ``goodbye`` (store calls) on a daemon thread; whether it ended within
        ``_CLOSE_JOIN_S``. A learner cut off or frozen since the last beat never answers
        a store call, and a close must not wait for it."""
        done = threading.Event()

        def run() -> None:
            try:
                goodbye()
            except WeightSyncError as exc:  # the learner went away meanwhile: nothing to tell
                log.debug("%s: goodbye not delivered: %s", self._who, exc)
            finally:
                done.set()

        threading.Thread(target=run, name=f"weight-sync-bye-{self._tag}",
                         daemon=True).start()
        if done.wait(_CLOSE_JOIN_S):
            return True
        log.warning("%s: the learner did not answer the goodbye within %.0fs (cut off or "
                    "frozen); closing without it", self._who, _CLOSE_JOIN_S)
        return False

    def drain(self) -> None:
        """Drop what was handed over and never applied (the receiver is closing)."""
        while not self.inbox.empty():
            self.inbox.get_nowait()

    @staticmethod
    def _join_threads(att: Attachment, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for thread in att.threads:
            if thread is not threading.current_thread():
                thread.join(max(deadline - time.monotonic(), 0))
