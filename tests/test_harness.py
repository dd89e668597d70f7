"""The process harness itself: results, tracebacks, kill-on-failure, global timeout,
fast failure while the test waits, the cluster's reports and reaping."""

from __future__ import annotations

import os
import signal
import struct
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection

import harness
import pytest

pytestmark = pytest.mark.timeout(90)


# -- children (module level: picklable by reference) -----------------------------------
def _square(x: int) -> int:
    return x * x


def _fail(message: str) -> None:
    raise ValueError(message)


def _block(event: object) -> str:
    event.wait(120)  # type: ignore[attr-defined]  # never set: only a kill ends it
    return "unblocked"


def _vanish(code: int) -> None:
    os._exit(code)


def _unpicklable() -> object:
    return lambda: None


def _echo(inbox: Connection, outbox: Connection) -> str:
    outbox.send(("hello", harness.recv(inbox, 30)))
    return "done"


def _reporter(info: str, cid: int, out: Connection, cmds: Connection) -> None:
    """A cluster child: says hello, then obeys ``"ping"``, ``"stop"`` and ``"raise"``."""
    out.send(("hello", cid, info, os.getpid()))
    while True:
        cmd = harness.recv(cmds, 60, "a command")
        if cmd == "ping":
            out.send(("pong", cid))
        if cmd == "raise":
            raise ValueError(f"collector {cid} was told to raise")
        if cmd == "stop":
            out.send(("exit", cid, None, None, os.getpid()))
            return


def _dies_mid_write(info: str, cid: int, out: Connection, cmds: Connection) -> None:
    """Half a message (a 1000-byte header, 10 bytes of it), then SIGKILL."""
    os.write(out.fileno(), struct.pack("!i", 1000) + b"x" * 10)
    os.kill(os.getpid(), signal.SIGKILL)


def _assert_reaped(handle: harness._Children) -> None:
    assert handle.processes
    assert all(not p.is_alive() and p.exitcode is not None for p in handle.processes)


# -- run_processes / Procs -------------------------------------------------------------
def test_values_come_back_in_rank_order() -> None:
    assert harness.run_processes([(_square, (i,)) for i in range(3)], timeout=60) == [0, 1, 4]


def test_no_targets_is_an_error() -> None:
    with pytest.raises(ValueError, match="no targets"):
        harness.run_processes([], timeout=1)


def test_first_failure_kills_the_others_and_carries_traceback() -> None:
    never = harness.CTX.Event()
    start = time.monotonic()
    handle = harness.Procs([(_block, (never,)), (_fail, ("boom from rank 1",)),
                            (_block, (never,))])
    with pytest.raises(harness.ChildFailed) as info:
        handle.join(timeout=60)
    assert info.value.rank == 1
    assert "ValueError: boom from rank 1" in str(info.value)
    assert "Traceback" in info.value.detail
    _assert_reaped(handle)
    assert handle.running() == []
    assert time.monotonic() - start < 60  # did not wait for the blocked ranks


def test_global_timeout_names_running_ranks_and_kills_them() -> None:
    never = harness.CTX.Event()
    handle = harness.Procs([(_square, (3,)), (_block, (never,)), (_block, (never,))])
    with pytest.raises(harness.ChildTimeout) as info:
        handle.join(timeout=5)
    assert info.value.ranks == [1, 2]
    assert "[1, 2]" in str(info.value)
    _assert_reaped(handle)


def test_child_dying_without_result_is_a_failure() -> None:
    with pytest.raises(harness.ChildFailed, match="exited with code 3") as info:
        harness.run_processes([(_vanish, (3,)), (_square, (2,))], timeout=60)
    assert info.value.rank == 0


def test_unpicklable_result_is_a_failure_not_a_hang() -> None:
    with pytest.raises(harness.ChildFailed, match=r"(?i)pickle"):
        harness.run_processes([(_unpicklable, ())], timeout=60)


def test_children_that_use_torch_run_one_thread() -> None:
    import torch

    assert harness.run_processes([(torch.get_num_threads, ())], timeout=60) == [1]


# -- spawn_collectors: the test process plays the learner ------------------------------
def test_spawn_collectors_parent_plays_learner() -> None:
    inbox, to_child = harness.pipe()
    from_child, outbox = harness.pipe()
    with harness.spawn_collectors([(_echo, (inbox, outbox))], timeout=60) as handle:
        assert inbox.closed and outbox.closed  # handed over: EOF means the child is gone
        to_child.send(42)
        assert handle.get(from_child, timeout=30) == ("hello", 42)
    assert handle.results == ["done"]
    _assert_reaped(handle)


def test_spawn_collectors_reports_child_failure_while_parent_waits() -> None:
    never, _writer = harness.pipe()
    start = time.monotonic()
    with pytest.raises(harness.ChildFailed, match="boom"), \
            harness.spawn_collectors([(_fail, ("boom",))], timeout=60) as handle:
        handle.get(never, timeout=60)  # fails fast: the child died
    assert time.monotonic() - start < 30
    _assert_reaped(handle)


def test_get_times_out_naming_running_ranks() -> None:
    never = harness.CTX.Event()
    reader, _writer = harness.pipe()
    with pytest.raises(harness.ChildTimeout, match="waiting for the answer") as info, \
            harness.spawn_collectors([(_block, (never,))], timeout=60) as handle:
        handle.get(reader, timeout=2, what="the answer")
    assert info.value.ranks == [0]
    _assert_reaped(handle)


def test_get_fails_fast_when_every_child_exited_without_sending() -> None:
    reader, _writer = harness.pipe()
    start = time.monotonic()
    with pytest.raises(AssertionError, match="every child has exited"), \
            harness.spawn_collectors([(_square, (2,))], timeout=60) as handle:
        handle.get(reader, timeout=60, what="a message nobody sends")
    assert time.monotonic() - start < 30
    _assert_reaped(handle)


def test_spawn_collectors_kills_children_when_parent_fails() -> None:
    never = harness.CTX.Event()
    with pytest.raises(KeyError, match="learner broke"), \
            harness.spawn_collectors([(_block, (never,))], timeout=60) as handle:
        raise KeyError("learner broke")
    _assert_reaped(handle)


# -- Cluster: children that may die on purpose ------------------------------------------
@pytest.fixture
def cluster() -> Iterator[harness.Cluster]:
    """This module's own cluster: :func:`_reporter` as the default collector."""
    c = harness.Cluster(collector=_reporter)
    try:
        yield c
    finally:
        c.shutdown()
    assert not [p for p in harness.CTX.active_children() if p in c.processes]
    _assert_reaped(c)


def test_cluster_reports_commands_kill_restart_and_stop(cluster: harness.Cluster) -> None:
    first = cluster.start("info", 0)
    cluster.start("info", 1)
    hellos = [cluster.take(lambda m, c=cid: m[:2] == ("hello", c), 60, f"{cid}'s hello")
              for cid in (0, 1)]
    assert [m[2:] for m in hellos] == [("info", first.pid), ("info", cluster.procs[1].pid)]
    cluster.kill(0)  # a death is no failure in a cluster
    assert first.exitcode == -signal.SIGKILL
    second = cluster.start("again", 0)  # a restart: new process, new commands pipe
    assert cluster.procs[0] is second and second.pid != first.pid
    assert cluster.take(lambda m: m[:2] == ("hello", 0), 60, "the restart's hello")[2] == "again"
    cluster.stop(0, 1)
    for proc in (second, cluster.procs[1]):
        proc.join(30)
        assert proc.exitcode == 0
    assert len(cluster.processes) == 3


def test_cluster_child_dying_mid_write_wedges_nobody(cluster: harness.Cluster) -> None:
    cluster.start("info", 0, _dies_mid_write)
    cluster.start("info", 1)
    cluster.procs[0].join(30)
    assert cluster.procs[0].exitcode == -signal.SIGKILL
    assert cluster.take(lambda m: m[:2] == ("hello", 1), 60, "1's hello")[1] == 1
    cluster.stop(1)
    assert not [m for m in cluster.backlog if m[1] == 0]  # the half message was dropped


def test_cluster_child_raising_fails_the_wait_with_its_traceback(
        cluster: harness.Cluster) -> None:
    cluster.start("info", 0)
    cluster.start("info", 1)
    for cid in (0, 1):
        cluster.take(lambda m, c=cid: m[:2] == ("hello", c), 60, f"{cid}'s hello")
    cluster.cmds[1].send("raise")
    start = time.monotonic()
    with pytest.raises(harness.ChildFailed) as info:
        cluster.take(lambda m: m[0] == "never sent", 60, "a report that never comes")
    assert time.monotonic() - start < 30  # at once, not at the wait's timeout
    assert info.value.rank == 1 and "collector-1" in str(info.value)
    assert "ValueError: collector 1 was told to raise" in info.value.detail
    assert "Traceback" in info.value.detail
    _assert_reaped(cluster)  # the others were killed too


def test_cluster_wait_times_out_naming_running_ranks_and_the_backlog(
        cluster: harness.Cluster) -> None:
    cluster.start("info", 0)
    cluster.take(lambda m: m[0] == "hello", 60, "0's hello")
    cluster.cmds[0].send("ping")
    with pytest.raises(harness.ChildTimeout) as info:
        cluster.take(lambda m: m[0] == "never sent", 3, "a report that never comes")
    assert info.value.ranks == [0]
    assert "a report that never comes" in str(info.value)
    assert "backlog: [('pong', 0)]" in str(info.value)
    _assert_reaped(cluster)


def test_cluster_wait_ends_when_no_child_can_report(cluster: harness.Cluster) -> None:
    cluster.start("info", 0, _dies_mid_write)
    start = time.monotonic()
    with pytest.raises(harness.ChildTimeout, match="every report pipe is closed"):
        cluster.take(lambda m: True, 60, "any report")
    assert time.monotonic() - start < 30
