"""The learner's always-open door (real processes): while the learner makes no
weight-sync call at all (it trains, evaluates, sleeps between calls), a collector that
joins is admitted, connected and caught up, and one that is refused gets its typed
error, each within ~2 s of saying hello. Before the door, joins were looked for only
inside the learner's calls: these collectors waited out their whole connect timeout."""

from __future__ import annotations

import os
import time
from multiprocessing.connection import Connection

import pytest
from harness import CTX, Cluster
from versioned import RX_TIMEOUT_S, expected, fingerprint, make_weights, publish

from weight_sync import ConnectionInfo, WeightReceiver, WeightSender, WeightSyncError
from weight_sync.wire.auth import SECRET_ENV

pytestmark = pytest.mark.timeout(180)

SECRET = "door-test secret"
#: From a collector's connect() to its weights applied, or to its typed refusal.
DOOR_BOUND_S = 2.0
JOIN_TIMEOUT_S = 30.0  # what a collector waited, refused or not, with no door


@pytest.fixture(autouse=True)
def _no_secret_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SECRET_ENV, raising=False)


def joining_collector(info: ConnectionInfo, cid: int, out: Connection, cmds: Connection,
                      secret: str, variant: str) -> None:
    """Connect (timed), report ``("applied", cid, version, fingerprint, seconds)`` or
    ``("error", cid, type, message, seconds)``, then poll until told to stop."""
    weights = make_weights(-7, variant=variant)
    rx = WeightReceiver(weights, info, cid, timeout=RX_TIMEOUT_S, secret=secret)
    try:
        start = time.monotonic()
        try:
            version = rx.connect(timeout=JOIN_TIMEOUT_S)
        except WeightSyncError as exc:
            out.send(("error", cid, type(exc).__name__, str(exc),
                      time.monotonic() - start, os.getpid()))
            return
        out.send(("applied", cid, version, fingerprint(weights), time.monotonic() - start,
                  os.getpid()))
        while not cmds.poll(0):  # keep the stream, applying versions, until told
            rx.receive_weights(timeout=0.05)
    finally:
        rx.close()


def _outcome(cluster: Cluster, cid: int) -> tuple[object, ...]:
    return cluster.take(lambda m: m[0] in ("applied", "error") and m[1] == cid,
                        JOIN_TIMEOUT_S + 30, f"collector {cid}'s connect to end")


def _connected_learner(cluster: Cluster, max_collectors: int, secret: str = ""
                       ) -> tuple[WeightSender, int]:
    """A learner serving collector 0 (a process), version 1 acked."""
    weights = make_weights(0)
    sender = WeightSender(weights, 1, max_collectors=max_collectors, timeout=RX_TIMEOUT_S,
                          secret=secret)
    try:
        cluster.start(sender.connection_info, 0, joining_collector, (secret, "base"))
        sender.connect(timeout=60)
        assert _outcome(cluster, 0)[0] == "applied"
        v = publish(sender, weights)
        assert sender.wait_ack(timeout=30).complete
    except BaseException:
        sender.close()
        raise
    return sender, v


def test_a_join_is_admitted_and_caught_up_while_the_learner_sleeps(cluster: Cluster) -> None:
    sender, v = _connected_learner(cluster, max_collectors=2)
    with sender:
        cluster.start(sender.connection_info, 1, joining_collector, ("", "base"))
        # From here the learner makes no weight-sync call until the collector reported.
        msg = _outcome(cluster, 1)
        assert msg[0] == "applied", msg
        assert msg[2] == v and msg[3] == expected(v), "not caught up with the newest version"
        assert msg[4] < DOOR_BOUND_S, f"admitted and caught up after {msg[4]:.2f}s"
        assert sender.wait_for([1], timeout=10).acked == (0, 1)


def test_refused_joins_get_their_typed_errors_while_the_learner_sleeps(
        cluster: Cluster) -> None:
    sender, _ = _connected_learner(cluster, max_collectors=4, secret=SECRET)
    with sender:
        info = sender.connection_info
        tries = {1: ("guess", "base", "AuthenticationError"),   # a wrong secret
                 2: ("", "base", "AuthenticationError"),        # none
                 3: (SECRET, "other_shape", "LayoutMismatchError"),
                 0: (SECRET, "base", "DuplicateCollectorError")}  # 0 is live
        for cid, (secret, variant, _) in tries.items():
            if cid == 0:  # a second process for the live id (the first keeps its pipes)
                reader, _writer = CTX.Pipe(duplex=False)
                cluster.start_process(joining_collector, (info, 0, cluster.pipe(), reader,
                                                          secret, variant), "duplicate-0")
            else:
                cluster.start(info, cid, joining_collector, (secret, variant))
        # The learner makes no weight-sync call until every collector reported.
        outcomes = {cid: _outcome(cluster, cid) for cid in tries}
        for cid, (_, _, error) in tries.items():
            msg = outcomes[cid]
            assert msg[0] == "error" and msg[2] == error, msg
            assert msg[4] < DOOR_BOUND_S, f"collector {cid} refused after {msg[4]:.2f}s"
        assert sorted(sender.links) == [0]
