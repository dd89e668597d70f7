"""Polls that never block (real processes): a collector polling with
``receive_weights(timeout=0)`` while its learner is frozen (SIGSTOP) returns from
every call within milliseconds, also the call that applies a version whose ack the
frozen learner cannot take (the ack leaves the collector's thread); a ``timeout=t``
call returns within t plus a small margin. Before, the apply's ack was a store call on
the caller's thread and the poll blocked for the whole freeze."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection

import pytest
from harness import Cluster
from versioned import RX_TIMEOUT_S, expected, fingerprint, make_weights, publish

from weight_sync import WeightReceiver, WeightSender
from weight_sync.collector.hooks import ReceiverHooks

pytestmark = pytest.mark.timeout(180)

log = logging.getLogger(__name__)

FREEZE_S = 3.0
POLL_BOUND_S = 0.05  # the longest a timeout=0 poll may take (issue 24: ~50 ms)
SLICE_S = 0.2  # a timeout=t poll during the freeze
SLICE_MARGIN_S = 0.05


def publishing_learner(out: Connection, go: Connection) -> None:
    """Connect one collector; publish a version (then wait for its ack) each time told."""
    weights = make_weights(0)
    with WeightSender(weights, 1, timeout=RX_TIMEOUT_S) as sender:
        out.send(("info", sender.connection_info, os.getpid()))
        sender.connect(timeout=60)
        while go.poll(120):
            try:
                if go.recv() != "publish":
                    return
            except EOFError:  # the test is over
                return
            v = publish(sender, weights)
            out.send(("published", v))
            sender.wait_ack(timeout=60)
            out.send(("acked", v))


@pytest.fixture
def learner(cluster: Cluster) -> Iterator[tuple[int, Connection, object]]:
    """The learner process: (pid, its go pipe, its connection info); resumed if a test
    left it stopped, then killed with the cluster."""
    cluster.learner = publishing_learner
    proc, go = cluster.start_learner()
    msg = cluster.take(lambda m: m[0] == "info", 60, "the learner's connection info")
    try:
        yield msg[2], go, msg[1]
    finally:
        if proc.pid is not None and proc.exitcode is None:
            os.kill(proc.pid, signal.SIGCONT)


def _env_step() -> None:
    """What a collector does between two polls (a few ms of environment)."""
    time.sleep(0.005)


def test_polls_never_block_on_a_frozen_learner(cluster: Cluster, learner: tuple) -> None:
    pid, go, info = learner
    landed = threading.Event()
    mine = make_weights(-7)
    hooks = ReceiverHooks(after_receive=lambda version, data: landed.set() if version else None)
    rx = WeightReceiver(mine, info, 0, timeout=RX_TIMEOUT_S, learner_timeout=30.0,
                        hooks=hooks)
    try:
        assert rx.connect(timeout=60) == 0
        go.send("publish")
        assert landed.wait(30), "version 1 never arrived"
        # Version 1 is received and waits to be applied: freeze the learner now, so the
        # apply's ack cannot reach it.
        os.kill(pid, signal.SIGSTOP)
        thaw = threading.Timer(FREEZE_S, os.kill, (pid, signal.SIGCONT))
        thaw.start()
        longest, applied = 0.0, []
        try:
            end = time.monotonic() + FREEZE_S - 0.5
            while time.monotonic() < end:
                start = time.monotonic()
                got = rx.receive_weights(timeout=0)
                longest = max(longest, time.monotonic() - start)
                if got is not None:
                    applied.append(got)
                _env_step()
            start = time.monotonic()
            assert rx.receive_weights(timeout=SLICE_S) is None
            sliced = time.monotonic() - start
        finally:
            thaw.join()
        log.info("longest timeout=0 poll with the learner frozen: %.1f ms", longest * 1e3)
        assert applied == [1] and fingerprint(mine) == expected(1)
        assert longest < POLL_BOUND_S, f"a timeout=0 poll took {longest * 1e3:.1f} ms"
        assert sliced < SLICE_S + SLICE_MARGIN_S, f"timeout={SLICE_S} took {sliced:.3f}s"
        # Thawed: the ack sent meanwhile lands, and the stream goes on.
        cluster.take(lambda m: m[0] == "acked" and m[1] == 1, 30, "the learner's ack of v1")
        go.send("publish")
        assert rx.receive_weights(timeout=RX_TIMEOUT_S) == 2
        assert fingerprint(mine) == expected(2)
        cluster.take(lambda m: m[0] == "acked" and m[1] == 2, 30, "the learner's ack of v2")
    finally:
        rx.close()


CLOSE_BOUND_S = 8.0  # the goodbye's 2 s and the threads' joins, on a loaded 2-core machine


def test_close_returns_while_the_learner_is_frozen(cluster: Cluster, learner: tuple) -> None:
    """The goodbye to the learner is a store call, which a frozen or cut-off learner never
    answers: close() gives up on it (before, a collector whose stream ended other than by
    the learner watch hung in close() until the learner came back, forever after a cut)."""
    pid, go, info = learner
    mine = make_weights(-7)
    rx = WeightReceiver(mine, info, 0, timeout=RX_TIMEOUT_S, learner_timeout=60.0)
    try:
        assert rx.connect(timeout=60) == 0
        os.kill(pid, signal.SIGSTOP)  # frozen well inside learner_timeout: not yet "lost"
        start = time.monotonic()
        rx.close()
        took = time.monotonic() - start
    finally:
        os.kill(pid, signal.SIGCONT)
        rx.close()
    assert took < CLOSE_BOUND_S, f"close() took {took:.1f}s with the learner frozen"
    go.send("publish")  # thawed, the learner goes on; the version is not waited for here
