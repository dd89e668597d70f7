"""Typed errors of the collector group, raised in the learner.

Every error is a :class:`~weight_sync.errors.WeightSyncError` (catch that to handle any
failure of weight-sync) and a :class:`CollectorError` naming the collector involved, so a
log line alone says which process failed and why.
"""

from __future__ import annotations

import signal

from weight_sync.errors import WeightSyncError, WeightSyncTimeout

__all__ = [
    "CollectorCrashed",
    "CollectorDied",
    "CollectorError",
    "CollectorRefused",
    "CollectorTimeout",
    "PlacementTimeout",
    "describe_exitcode",
]


def describe_exitcode(exitcode: int | None) -> str:
    """``-9`` -> ``"killed by SIGKILL"``, ``1`` -> ``"exit code 1"``, ``None`` -> running."""
    if exitcode is None:
        return "still running"
    if exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"


class CollectorError(WeightSyncError):
    """A collector process failed; the learner cannot count on its batches.

    Attributes:
        worker_id: the failed collector (``None`` when the error concerns all of them).
        traceback: the formatted traceback the collector reported, if any.
        exitcode: the process's exit code (negative: killed by that signal), if known.
    """

    def __init__(self, message: str, worker_id: int | None, *, traceback: str | None = None,
                 exitcode: int | None = None) -> None:
        super().__init__(message)
        self.worker_id = worker_id
        self.traceback = traceback
        self.exitcode = exitcode


class CollectorCrashed(CollectorError):
    """The collector raised an exception; ``traceback`` is its formatted traceback."""


class CollectorDied(CollectorError):
    """The collector process ended without reporting an error (killed, or exited early)."""


class CollectorRefused(CollectorError):
    """The learner would not admit this collector (raised in the collector that tried):
    its id is outside the learner's range, already connected, or was never launched, or
    it could not prove the shared key."""


class CollectorTimeout(CollectorError, WeightSyncTimeout):
    """No collector delivered what the learner waited for within the timeout."""


class PlacementTimeout(CollectorTimeout):
    """The cluster could not reserve the collectors' resources within the timeout (e.g. a
    Ray placement group asking for more CPUs than the cluster has)."""
