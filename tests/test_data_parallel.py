"""A data-parallel learner (2 ranks, a real gloo process group) serving 5 collectors:
each rank serves its share, every collector ends bit-exact with the learner."""

from __future__ import annotations

import os
from datetime import timedelta
from multiprocessing.connection import Connection

import pytest
import torch
import torch.distributed as dist
from harness import Cluster, free_port
from versioned import expected, fingerprint, make_weights, set_version

from weight_sync import ConnectionInfo, WeightReceiver
from weight_sync.errors import ClosedError, ConfigError, PeerGone
from weight_sync.learner.data_parallel import DataParallelSender, rank_and_world_size

NUM_COLLECTORS = 5
VERSIONS = 3


# -- children (module level: picklable by reference) -----------------------------------
def dp_learner(rank: int, port: int, out: Connection) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2, timeout=timedelta(seconds=90))
    try:
        weights = make_weights(0)
        with DataParallelSender(weights, NUM_COLLECTORS, timeout=30) as sender:
            if rank == 0:
                out.send(("assign", [sender.assignment(i) for i in range(NUM_COLLECTORS)]))
            sender.connect(timeout=120)
            for version in range(1, VERSIONS + 1):
                set_version(weights, version)  # as after an all-reduce: the same on both
                assert sender.send_weights_async() == version
                result = sender.wait_ack(timeout=60)
                assert result is not None
                out.send(("acked", rank, version, result.acked))
            dist.barrier()
    finally:
        dist.destroy_process_group()
    out.send(("done", rank))


def dp_collector(info: ConnectionInfo, global_id: int, out: Connection, cmds: Connection,
                 local_id: int) -> None:
    torch.set_num_threads(1)
    weights = make_weights(-1)
    receiver = WeightReceiver(weights, info, local_id, timeout=60)
    try:
        version = receiver.connect(timeout=120)
        while True:
            out.send(("applied", global_id, version, fingerprint(weights), os.getpid()))
            version = None
            while version is None:
                version = receiver.receive_weights(timeout=1)
    except (ClosedError, PeerGone):
        pass
    finally:
        receiver.close()
        out.send(("exit", global_id, None, None, os.getpid()))


# -- tests ---------------------------------------------------------------------------------
def test_rank_and_world_size_sources(monkeypatch: pytest.MonkeyPatch) -> None:
    assert rank_and_world_size(1, 3) == (1, 3)
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert rank_and_world_size() == (2, 4)
    with pytest.raises(ConfigError, match="got 4"):
        rank_and_world_size(4, 4)


def test_single_rank_and_misuse() -> None:
    with DataParallelSender(make_weights(0), 3, rank=0, world_size=1) as sender:
        [info] = sender.infos
        assert sender.sender is not None and info == sender.sender.connection_info
        assert [sender.assignment(i) for i in range(3)] == [(info, 0), (info, 1), (info, 2)]
        with pytest.raises(ConfigError, match="got 3"):
            sender.assignment(3)
    with pytest.raises(ConfigError, match="default process group"):
        DataParallelSender(make_weights(0), 4, rank=0, world_size=2)
    with pytest.raises(ConfigError, match="num_collectors must be an int >= the 2"):
        DataParallelSender(make_weights(0), 1, rank=0, world_size=2)


def test_two_ranks_share_five_collectors(cluster: Cluster) -> None:
    port = free_port()
    learners = [cluster.start_process(dp_learner, (rank, port, cluster.pipe()), f"rank-{rank}")
                for rank in (0, 1)]
    assignments = cluster.take(lambda m: m[0] == "assign", 120, "the assignments")[1]
    served = {(info.port, local) for info, local in assignments}
    assert len(served) == NUM_COLLECTORS  # every collector has its own (rank, id) slot
    assert len({info.port for info, _ in assignments}) == 2  # both ranks serve
    for gid, (info, local) in enumerate(assignments):
        cluster.start(info, gid, dp_collector, (local,))
    for rank in (0, 1):
        for version in range(1, VERSIONS + 1):
            msg = cluster.take(lambda m, r=rank, v=version: m[:3] == ("acked", r, v), 120,
                               f"rank {rank} version {version} acked")
            share = len(range(rank, NUM_COLLECTORS, 2))
            assert msg[3] == tuple(range(share))
    for gid in range(NUM_COLLECTORS):
        msg = cluster.applied(gid, VERSIONS, timeout=60)
        assert msg[2] == VERSIONS and msg[3] == expected(VERSIONS), gid
    for rank in (0, 1):
        cluster.take(lambda m, r=rank: m[:2] == ("done", r), 60, f"rank {rank} done")
        learners[rank].join(30)
        assert learners[rank].exitcode == 0
    for gid in range(NUM_COLLECTORS):
        cluster.take(lambda m, g=gid: m[:2] == ("exit", g), 60, f"collector {gid} exit")
