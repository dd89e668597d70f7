"""The learner's liveness, both sides: its heartbeat, and a collector's watch on it.

The store server lives in the learner's process, so a learner that is frozen
(SIGSTOP, a hung host) or cut off (a link down) does not close any socket: a store
call to it neither returns nor times out (measured with torch 2.13: a TCPStore ``add``
against a stopped server still waited after 57 s, with a 3 s client timeout). So the
learner beats a counter from a background thread (a learner busy training between two
``send_weights_async`` calls still beats), each collector's heartbeat thread reads it,
and a separate watch thread, which never touches the store, declares the learner gone
when the counter has not moved for ``learner_timeout`` seconds, whatever the store
calls are doing.
"""

from __future__ import annotations

import logging
import threading
import time

from weight_sync.control.channel import Control
from weight_sync.errors import PeerGone, WeightSyncError

__all__ = ["LearnerHeartbeat", "LearnerWatch"]

log = logging.getLogger(__name__)

# close() waits this long for the beat thread (it is a daemon thread either way).
_CLOSE_JOIN_S = 2.0


class LearnerHeartbeat:
    """The learner's heartbeat: bumps ``beat`` every ``interval`` s from a daemon thread.

    Args:
        control: a store client of its own (the thread's; closed by :meth:`close`).
        interval: seconds between beats.
    """

    def __init__(self, control: Control, interval: float) -> None:
        self._control = control
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="weight-sync-learner-beat",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                self._control.learner_beat()
            except WeightSyncError as exc:  # the store stopped under us: closing
                log.debug("learner heartbeat stops: %s", exc)
                return
            if self._stop.wait(self._interval):
                return

    def close(self) -> None:
        """Stop beating (collectors that did not read the close then see the learner
        go silent); idempotent."""
        self._stop.set()
        self._thread.join(_CLOSE_JOIN_S)
        self._control.close()


class LearnerWatch:
    """A collector's view of the learner's heartbeat.

    Args:
        who: the collector, for messages.
        timeout: how long the counter may stand still before the learner is gone.
    """

    def __init__(self, who: str, timeout: float) -> None:
        self.who = who
        self.timeout = timeout
        self._last = (-1, time.monotonic())  # (counter, when it last moved): one object

    def saw(self, beats: int) -> None:
        """Record a reading of the learner's counter."""
        if beats != self._last[0]:
            self._last = (beats, time.monotonic())

    def check(self) -> None:
        """Raise if the learner has been silent too long.

        Raises:
            PeerGone: no beat for more than ``timeout`` s.
        """
        silent = time.monotonic() - self._last[1]
        if silent > self.timeout:
            raise PeerGone(f"{self.who}: no sign of life from the learner for {silent:.1f}s "
                           f"(learner_timeout {self.timeout}s): it is frozen, unreachable "
                           f"or gone")
