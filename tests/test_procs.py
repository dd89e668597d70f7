"""The process helper itself: results, tracebacks, kill-on-failure, global timeout."""

from __future__ import annotations

import os
import time

import procs
import pytest

pytestmark = pytest.mark.timeout(90)


def _square(x: int) -> int:
    return x * x


def _fail(message: str) -> None:
    raise ValueError(message)


def _block(event: object) -> str:
    event.wait(120)  # type: ignore[attr-defined]  # never set: only a kill ends it
    return "unblocked"


def _vanish(code: int) -> None:
    os._exit(code)


def _echo(inbox: object, outbox: object) -> str:
    outbox.put(("hello", inbox.get(timeout=30)))  # type: ignore[attr-defined]
    return "done"


def _assert_reaped(handle: procs.Procs) -> None:
    assert all(not p.is_alive() and p.exitcode is not None for p in handle.processes)


def test_values_come_back_in_rank_order() -> None:
    assert procs.run_processes([(_square, (i,)) for i in range(3)], timeout=60) == [0, 1, 4]


def test_first_failure_kills_the_others_and_carries_traceback() -> None:
    never = procs.CTX.Event()
    start = time.monotonic()
    handle = procs.Procs([(_block, (never,)), (_fail, ("boom from rank 1",)),
                          (_block, (never,))])
    with pytest.raises(procs.ChildFailed) as info:
        handle.join(timeout=60)
    assert info.value.rank == 1
    assert "ValueError: boom from rank 1" in str(info.value)
    assert "Traceback" in info.value.detail
    _assert_reaped(handle)
    assert time.monotonic() - start < 60  # did not wait for the blocked ranks


def test_global_timeout_names_running_ranks_and_kills_them() -> None:
    never = procs.CTX.Event()
    handle = procs.Procs([(_square, (3,)), (_block, (never,)), (_block, (never,))])
    with pytest.raises(procs.ChildTimeout) as info:
        handle.join(timeout=5)
    assert info.value.ranks == [1, 2]
    assert "[1, 2]" in str(info.value)
    _assert_reaped(handle)


def test_child_dying_without_result_is_a_failure() -> None:
    with pytest.raises(procs.ChildFailed, match="exited with code 3"):
        procs.run_processes([(_vanish, (3,)), (_square, (2,))], timeout=60)


def test_spawn_collectors_parent_plays_learner() -> None:
    inbox, outbox = procs.CTX.Queue(), procs.CTX.Queue()
    with procs.spawn_collectors([(_echo, (inbox, outbox))], timeout=60) as handle:
        inbox.put(42)
        assert handle.get(outbox, timeout=30) == ("hello", 42)
    assert handle.results == ["done"]
    _assert_reaped(handle)


def test_spawn_collectors_reports_child_failure_while_parent_waits() -> None:
    never = procs.CTX.Queue()
    with pytest.raises(procs.ChildFailed, match="boom"), \
            procs.spawn_collectors([(_fail, ("boom",))], timeout=60) as handle:
        handle.get(never, timeout=60)  # fails fast: the child died
    _assert_reaped(handle)


def test_spawn_collectors_kills_children_when_parent_fails() -> None:
    never = procs.CTX.Event()
    with pytest.raises(KeyError, match="learner broke"), \
            procs.spawn_collectors([(_block, (never,))], timeout=60) as handle:
        raise KeyError("learner broke")
    _assert_reaped(handle)
