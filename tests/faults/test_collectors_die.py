"""Collectors SIGKILLed while idle, mid-transfer and before their ack; restarted
collectors rejoining; elastic collectors joining. The test process is the learner."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch
from harness import Cluster
from versioned import (
    MARGIN_S,
    RX_TIMEOUT_S,
    big_weights,
    collector_dies_in_handshake,
    collector_dies_mid_transfer,
    collector_main,
    connect_all,
    expected,
    make_weights,
    publish,
)

from weight_sync import AckResult, CollectorFailed, WeightReceiver, WeightSender, WeightSyncTimeout
from weight_sync.errors import ConfigError


@pytest.mark.parametrize("transport", ["distributed", "shm"])
def test_collector_killed_idle_then_rejoins_then_killed_before_ack(
        cluster: Cluster, transport: str) -> None:
    weights = make_weights(0)
    with WeightSender(weights, 3, timeout=RX_TIMEOUT_S, transport=transport) as sender:
        connect_all(sender, cluster, [0, 1, 2])

        # collector 0 SIGKILLed while idle
        killed_pid = cluster.procs[0].pid
        cluster.kill(0)
        v = publish(sender, weights)
        t_wait = 10.0
        start = time.monotonic()
        with pytest.raises(CollectorFailed) as info:
            sender.wait_ack(timeout=t_wait)
        assert time.monotonic() - start < t_wait + MARGIN_S
        err = info.value
        assert err.collector_id == 0 and "0" in str(err)
        assert err.pid == killed_pid  # tells the dead process from a restarted one
        result = err.result
        assert isinstance(result, AckResult)
        assert result.version == v and set(result.failed) == {0}
        assert result.acked == (1, 2) and result.lagging == ()
        assert 0 in sender.failed and 0 not in sender.links
        for cid in (1, 2):
            assert cluster.applied(cid, v)[3] == expected(v)
        # the next version reaches every live collector with a plain wait_ack
        v = publish(sender, weights)
        ok = sender.wait_ack(timeout=30)
        assert ok.complete and ok.acked == (1, 2) and ok.version == v
        for cid in (1, 2):
            msg = cluster.applied(cid, v)
            assert msg[2] == v and msg[3] == expected(v)

        # restart collector 0 with the same id: admitted at run time, caught up
        cluster.start(sender.connection_info, 0)
        ok = sender.wait_for([0], timeout=90)
        assert ok.complete and ok.acked == (0, 1, 2) and ok.version == v
        msg = cluster.applied(0, v)
        assert msg[2] == v and msg[3] == expected(v), "rejoined collector not bit-exact"
        assert 0 not in sender.failed
        v = publish(sender, weights)
        ok = sender.wait_ack(timeout=30)
        assert ok.complete and ok.acked == (0, 1, 2)
        for cid in (0, 1, 2):
            assert cluster.applied(cid, v)[3] == expected(v)

        # collector 1 receives but never applies (stops polling); killed while the
        # learner waits for its ack
        cluster.cmds[1].send("pause")
        cluster.take(lambda m: m[0] == "paused" and m[1] == 1, 30, "collector 1 to pause")
        v = publish(sender, weights)
        killer = threading.Timer(1.0, cluster.kill, args=(1,))
        t_wait = 20.0
        start = time.monotonic()
        killer.start()
        try:
            with pytest.raises(CollectorFailed) as info:
                sender.wait_ack(timeout=t_wait)
        finally:
            killer.join()
        waited = time.monotonic() - start
        assert waited < t_wait, f"dead collector cost the whole timeout ({waited:.1f}s)"
        assert info.value.collector_id == 1
        assert info.value.result.acked == (0, 2) and set(info.value.result.failed) == {1}
        v = publish(sender, weights)
        ok = sender.wait_ack(timeout=30)
        assert ok.complete and ok.acked == (0, 2)
        for cid in (0, 2):
            assert cluster.applied(cid, v)[3] == expected(v)
        cluster.stop(0, 2)


def test_collector_killed_mid_transfer(cluster: Cluster) -> None:
    """Collector 0 dies with half of a 128 MB message received; collector 1 gets it."""
    weights = big_weights(0)
    # A transfer to catch in the middle: sends (shared memory has none).
    with WeightSender(weights, 2, timeout=RX_TIMEOUT_S, transport="distributed") as sender:
        info = sender.connection_info
        cluster.start(info, 0, collector_dies_mid_transfer)
        cluster.start(info, 1, collector_main, (True,))
        sender.connect(timeout=90)
        for cid in (0, 1):
            assert cluster.applied(cid, 0)[3] == 0.0
        v = publish(sender, weights)
        t_wait = 20.0
        start = time.monotonic()
        with pytest.raises(CollectorFailed) as info_:
            sender.wait_ack(timeout=t_wait)
        waited = time.monotonic() - start
        mid = cluster.take(lambda m: m[0] == "mid", 30, "collector 0's mid-transfer report")
        assert mid[1] == 0 and mid[2] == v
        assert mid[3], "the whole message had arrived: the kill was not mid-transfer"
        assert waited < t_wait, f"dead collector cost the whole timeout ({waited:.1f}s)"
        result = info_.value.result
        assert info_.value.collector_id == 0
        assert set(result.failed) == {0} and result.acked == (1,)
        assert cluster.applied(1, v)[3] == float(v)
        v = publish(sender, weights)
        ok = sender.wait_ack(timeout=30)
        assert ok.complete and ok.acked == (1,)
        assert cluster.applied(1, v)[3] == float(v)
        assert sender.buffers_allocated <= 4, "snapshots leaked by the broken link"
        cluster.stop(1)


def test_elastic_collector_joins_up_to_max(cluster: Cluster) -> None:
    weights = make_weights(0)
    with WeightSender(weights, 2, timeout=RX_TIMEOUT_S, max_collectors=3) as sender:
        connect_all(sender, cluster, [0, 1])
        v = publish(sender, weights)
        assert sender.wait_ack(timeout=30).acked == (0, 1)
        info = sender.connection_info
        assert info.max_collectors == 3
        with pytest.raises(ConfigError, match=r"collector_id must be an int in \[0, 3\)"):
            WeightReceiver(make_weights(0), info, 3)
        with pytest.raises(ConfigError, match=r"wait_for: collector ids must be in \[0, 3\)"):
            sender.wait_for([3], timeout=1)
        with pytest.raises(WeightSyncTimeout, match=r"collector\(s\) \[2\] not connected"):
            sender.wait_for([2], timeout=1.5)
        cluster.start(info, 2)
        ok = sender.wait_for([2], timeout=90)
        assert ok.acked == (0, 1, 2) and ok.version == v
        assert cluster.applied(2, v)[3] == expected(v)
        v = publish(sender, weights)
        assert sender.wait_ack(timeout=30).acked == (0, 1, 2)
        for cid in (0, 1, 2):
            assert cluster.applied(cid, v)[3] == expected(v)
        assert torch.equal(weights["n"], torch.tensor(v))
        cluster.stop(0, 1, 2)


def test_frozen_collector_is_failed_by_its_stopped_heartbeat(cluster: Cluster) -> None:
    """A SIGSTOPped collector is alive to a pid check; its heartbeat tells the truth."""
    weights = make_weights(0)
    liveness = 3.0
    with WeightSender(weights, 2, timeout=RX_TIMEOUT_S, liveness_timeout=liveness) as sender:
        connect_all(sender, cluster, [0, 1])
        frozen = cluster.procs[0].pid
        os.kill(frozen, signal.SIGSTOP)
        try:
            v = publish(sender, weights)
            start = time.monotonic()
            with pytest.raises(CollectorFailed, match="no heartbeat") as info:
                sender.wait_ack(timeout=RX_TIMEOUT_S)
            waited = time.monotonic() - start
            assert liveness - 1 <= waited < RX_TIMEOUT_S, waited
            assert info.value.collector_id == 0 and info.value.result.acked == (1,)
            assert cluster.applied(1, v)[3] == expected(v)
            v = publish(sender, weights)
            ok = sender.wait_ack(timeout=30)
            assert ok.complete and ok.acked == (1,)
        finally:
            os.kill(frozen, signal.SIGKILL)
        cluster.stop(1)


def test_sends_without_waits_after_a_death_keep_serving_the_others(cluster: Cluster) -> None:
    """A learner that publishes every step and waits rarely: the dead collector's
    broken link neither raises from send_weights_async nor holds the others back."""
    weights = make_weights(0)
    with WeightSender(weights, 3, timeout=RX_TIMEOUT_S) as sender:
        connect_all(sender, cluster, [0, 1, 2])
        cluster.kill(0)
        for step in range(1, 5):
            assert publish(sender, weights) == step  # never raises
        assert all(sender.links[c].target_version == 4 for c in (1, 2))
        with pytest.raises(CollectorFailed) as info:
            sender.wait_ack(timeout=RX_TIMEOUT_S)
        assert info.value.collector_id == 0
        assert info.value.result.version == 4 and info.value.result.acked == (1, 2)
        for cid in (1, 2):
            assert cluster.applied(cid, 4)[3] == expected(4)
        assert sender.send_weights(timeout=30).acked == (1, 2)
        cluster.stop(1, 2)


def test_collector_dying_mid_handshake_never_blocks_the_learner(cluster: Cluster) -> None:
    """Admitted, then dead before its end of the link exists: the learner's rendezvous
    for it runs in the background, and a later restart of that id is admitted. (About
    a transport with a rendezvous: a shared-memory link has none to wait for.)"""
    weights = make_weights(0)
    link_timeout = 60.0  # how long the rendezvous would block the learner's thread
    with WeightSender(weights, 2, timeout=link_timeout, transport="distributed") as sender:
        connect_all(sender, cluster, [0, 1])
        cluster.kill(0)
        publish(sender, weights)
        with pytest.raises(CollectorFailed):
            sender.wait_ack(timeout=RX_TIMEOUT_S)
        cluster.start(sender.connection_info, 0, collector_dies_in_handshake)
        start = time.monotonic()
        with pytest.raises(WeightSyncTimeout, match=r"\[0\] not connected"):
            sender.wait_for([0], timeout=6)
        assert time.monotonic() - start < 6 + MARGIN_S
        cluster.take(lambda m: m[0] == "handshake" and m[1] == 0, 30, "the handshake")
        cluster.procs[0].join(30)
        assert cluster.procs[0].exitcode == -signal.SIGKILL
        assert 0 in sender._admissions.connecting  # its rendezvous is still waiting
        for _ in range(3):  # ... and costs the learner's calls nothing
            start = time.monotonic()
            v = publish(sender, weights)
            assert sender.wait_ack(timeout=RX_TIMEOUT_S).acked == (1,)
            assert time.monotonic() - start < link_timeout / 2
        cluster.start(sender.connection_info, 0)
        ok = sender.wait_for([0], timeout=90)
        assert ok.acked == (0, 1) and ok.version == v
        assert cluster.applied(0, v)[3] == expected(v)
        cluster.stop(0, 1)


def test_initial_connect_keeps_its_bound_when_a_collector_dies_in_handshake(
        cluster: Cluster) -> None:
    """The rendezvous with a collector that died after admission ends with connect's
    own timeout, not the links' (longer) one."""
    # a transport with a rendezvous (a shared-memory link has none to wait for)
    with WeightSender(make_weights(0), 2, timeout=120, transport="distributed") as sender:
        info = sender.connection_info
        cluster.start(info, 0)
        cluster.start(info, 1, collector_dies_in_handshake)
        start = time.monotonic()
        with pytest.raises(WeightSyncTimeout, match=r"collector 1 .*rendezvous"):
            sender.connect(timeout=15)
        assert time.monotonic() - start < 15 + MARGIN_S
        msg = cluster.take(lambda m: m[0] == "handshake", 30, "collector 1's handshake")
        assert msg[1] == 1
