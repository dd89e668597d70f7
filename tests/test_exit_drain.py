"""A process that exits while a blocking call of weight-sync is parked on another thread
(a store call to a cut-off learner, a gloo receive cut mid-transfer) waits, briefly, for
those that could return while the interpreter finalizes: a call that returned then
killed the process with SIGABRT ("terminate called without an active exception"), seen
on the test bed after a link cut. The exit waits at most its grace."""

from __future__ import annotations

import threading
import time

import pytest

from weight_sync.control.store import _InFlight
from weight_sync.errors import ClosedError

pytestmark = pytest.mark.timeout(30)

CALL_S = 0.6  # the parked call's length (it ends by itself, as a bounded gloo wait does)


def test_the_drain_waits_for_a_bounded_call_and_refuses_new_ones() -> None:
    flight = _InFlight()
    inside, ended = threading.Event(), []

    def parked() -> None:
        with flight.entered("a receive", bound=CALL_S):
            inside.set()
            time.sleep(CALL_S)  # stands in for the C++ wait: it returns at its bound
            ended.append(time.monotonic())

    thread = threading.Thread(target=parked, daemon=True)
    thread.start()
    assert inside.wait(10)
    start = time.monotonic()
    flight.drain(grace=3.0)  # the call ends within the grace: waited for, not the grace
    drained = time.monotonic()
    thread.join(10)
    assert ended and ended[0] <= drained, "the drain returned before the call ended"
    assert drained - start < 2.5, drained - start
    with pytest.raises(ClosedError, match="exiting"), flight.entered("a store call"):
        pass


def _drain_around_a_parked_call(flight: _InFlight, what: str, bound: float | None,
                                grace: float) -> float:
    """Park a call in ``flight`` (until released), drain with ``grace``; how long the
    drain took."""
    inside, release = threading.Event(), threading.Event()

    def parked() -> None:
        with flight.entered(what, bound=bound):
            inside.set()
            release.wait(20)

    thread = threading.Thread(target=parked, daemon=True)
    thread.start()
    assert inside.wait(10)
    start = time.monotonic()
    try:
        flight.drain(grace=grace)
        return time.monotonic() - start
    finally:
        release.set()
        thread.join(10)


def test_an_unbounded_call_is_waited_for_only_the_grace() -> None:
    flight = _InFlight()
    took = _drain_around_a_parked_call(flight, "a store call to a frozen learner", None, 0.3)
    assert 0.25 < took < 5.0, took
    flight.drain(grace=0.3)  # nothing in progress: returns at once


def test_a_call_ending_after_the_grace_holds_the_exit_for_the_grace_only() -> None:
    """A receive cut off by a learner's death waits for its whole timeout: the exit
    waits for it only the grace, then frees what it was asked to (closed groups)."""
    flight = _InFlight()
    released: list[float] = []
    flight.after_drain(lambda: released.append(time.monotonic()))
    took = _drain_around_a_parked_call(flight, "a receive from a dead learner", 60.0, 0.5)
    assert 0.4 < took < 2.0, took
    assert len(released) == 1
