"""A collector that stops polling gets the newest version when it resumes, not a queue
of old ones, and the learner's snapshots stay bounded meanwhile."""

from __future__ import annotations

import contextlib

from harness import Cluster
from versioned import RX_TIMEOUT_S, connect_all, expected, make_weights, publish

from weight_sync import WeightSender, WeightSyncError


def test_slow_collector_gets_newest_not_a_queue(cluster: Cluster) -> None:
    weights = make_weights(0)
    with WeightSender(weights, 2, timeout=RX_TIMEOUT_S) as sender:
        connect_all(sender, cluster, [0, 1])
        cluster.cmds[1].send("pause")
        cluster.take(lambda m: m[0] == "paused" and m[1] == 1, 30, "collector 1 to pause")
        first = None
        for _ in range(12):
            v = publish(sender, weights)
            first = first or v
            with contextlib.suppress(WeightSyncError):
                sender.wait_ack(timeout=0.3)  # collector 1 lags: a timeout, by design
            assert cluster.applied(0, v)[3] == expected(v)
        newest = sender.version
        assert sender.buffers_allocated <= 4, sender.buffers_allocated
        assert cluster.applies(1) == []  # nothing applied while paused
        cluster.cmds[1].send("resume")
        ok = sender.wait_ack(timeout=30)
        assert ok.complete and ok.acked == (0, 1)
        msg = cluster.applied(1, newest)
        assert msg[2] == newest and msg[3] == expected(newest)
        cluster.collect_for(0.3)
        got = cluster.applies(1)
        # at most the in-flight one, then the newest
        assert len(got) <= 1 and all(g in (first, newest) for g in got), got
        assert sender.buffers_allocated <= 4, sender.buffers_allocated
        cluster.stop(0, 1)
