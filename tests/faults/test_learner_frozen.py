"""The learner's liveness, seen from its collectors (real processes).

A learner frozen with SIGSTOP closes no socket, and a store call to it never returns:
its collectors still raise ``PeerGone`` from ``receive_weights`` within their
``learner_timeout`` (the learner's background heartbeat stood still), keep their last
weights, and exit. A learner that is merely busy (training for longer than that bound
between two sends) keeps beating and is not declared dead."""

from __future__ import annotations

import os
import signal
import time
from multiprocessing.connection import Connection

import pytest
import torch
from harness import Cluster
from versioned import RX_TIMEOUT_S, expected, fingerprint, make_weights, set_version

from weight_sync import ConnectionInfo, WeightReceiver, WeightSender, WeightSyncError

pytestmark = pytest.mark.timeout(180)


def watching_collector(info: ConnectionInfo, cid: int, out: Connection, cmds: Connection,
                       learner_timeout: float) -> None:
    """Connect with ``learner_timeout``, poll, report every apply and the error that
    ends the stream, then how long ``close()`` took."""
    weights = make_weights(-7)
    pid = os.getpid()
    rx = WeightReceiver(weights, info, cid, timeout=RX_TIMEOUT_S,
                        learner_timeout=learner_timeout)
    try:
        version = rx.connect(timeout=60)
        out.send(("applied", cid, version, fingerprint(weights), pid))
        while True:
            try:
                version = rx.receive_weights(timeout=0.05)
            except WeightSyncError as exc:
                out.send(("error", cid, type(exc).__name__, str(exc), fingerprint(weights),
                          pid))
                return
            if version is not None:
                out.send(("applied", cid, version, fingerprint(weights), pid))
    finally:
        start = time.monotonic()
        rx.close()
        out.send(("exit", cid, time.monotonic() - start, None, pid))


def busy_learner(out: Connection, go: Connection, num_collectors: int, busy_s: float,
                 liveness_timeout: float) -> None:
    """Connect; when told, train (compute, no send) for ``busy_s``, then publish v1."""
    weights = make_weights(0)
    sender = WeightSender(weights, num_collectors, timeout=RX_TIMEOUT_S,
                          liveness_timeout=liveness_timeout)
    out.send(("info", sender.connection_info, os.getpid()))
    sender.connect(timeout=60)
    out.send(("connected", os.getpid()))
    if go.poll(60):
        go.recv()
        a = torch.randn(256, 256)
        end = time.monotonic() + busy_s
        while time.monotonic() < end:  # a training step that outlasts learner_timeout
            a = torch.tanh(a @ a)
        out.send(("trained", os.getpid()))
        set_version(weights, 1)
        sender.send_weights_async()
        sender.wait_ack(timeout=RX_TIMEOUT_S)
        out.send(("acked", os.getpid()))
    go.poll(600)  # parked: the test kills this process


@pytest.mark.parametrize("learner_timeout", [
    3.0, pytest.param(10.0, marks=pytest.mark.slow, id="default-10.0")])
def test_frozen_learner_peer_gone_within_the_bound(cluster: Cluster,
                                                   learner_timeout: float) -> None:
    learner, go = cluster.start_learner(2)
    info = cluster.take(lambda m: m[0] == "info", 90, "the learner's info")[1]
    for cid in (0, 1):
        cluster.start(info, cid, watching_collector, (learner_timeout,))
    cluster.take(lambda m: m[0] == "connected", 90, "the learner to connect")
    go.send("publish")
    cluster.take(lambda m: m[0] == "acked", 90, "version 1 to be acked")
    for cid in (0, 1):
        assert cluster.applied(cid, 1)[3] == expected(1)
    assert learner.pid is not None
    os.kill(learner.pid, signal.SIGSTOP)
    frozen = time.monotonic()
    try:
        for cid in (0, 1):
            msg = cluster.take(lambda m, c=cid: m[0] in ("error", "exit") and m[1] == c,
                               RX_TIMEOUT_S * 3, f"collector {cid} to see the learner freeze")
            seen = time.monotonic() - frozen
            assert msg[:3] == ("error", cid, "PeerGone"), msg
            assert "no sign of life from the learner" in msg[3], msg
            assert msg[4] == expected(1), "weights changed while the learner was frozen"
            print(f"learner_timeout {learner_timeout}s: collector {cid} raised PeerGone "
                  f"{seen:.2f}s after SIGSTOP")
        for cid in (0, 1):
            done = cluster.take(lambda m, c=cid: m[0] == "exit" and m[1] == c, 30,
                                f"collector {cid} to exit")
            cluster.procs[cid].join(30)
            assert cluster.procs[cid].exitcode == 0
            print(f"collector {cid}: close() took {done[2]:.2f}s, then exited")
    finally:
        os.kill(learner.pid, signal.SIGCONT)  # then reaped by the fixture


def test_busy_learner_is_not_declared_dead(cluster: Cluster) -> None:
    """Training for 3x the collectors' bound between two sends: they wait, then apply."""
    cluster.learner = busy_learner
    cluster.start_learner(1, 6.0, 5.0)  # beats every 0.5 s
    info = cluster.take(lambda m: m[0] == "info", 90, "the learner's info")[1]
    cluster.start(info, 0, watching_collector, (2.0,))
    cluster.take(lambda m: m[0] == "connected", 90, "the learner to connect")
    assert cluster.applied(0, 0)[3] == expected(0)
    cluster._conns[-1].send("train")
    cluster.take(lambda m: m[0] == "trained", 60, "the learner to finish training")
    msg = cluster.applied(0, 1, timeout=60)
    assert msg[3] == expected(1)
    assert not [m for m in cluster.backlog if m[0] == "error"], cluster.backlog
