"""The nccl path: CUDA tensors end to end (learner on cuda:0, collector on cuda:1).

Skipped without two CUDA devices (nccl will not put two ranks of one link on the same
GPU); CI has none, so this runs only on a multi-GPU machine.
"""

from __future__ import annotations

import os
from multiprocessing.connection import Connection

import pytest
import torch
from harness import Cluster

from weight_sync import ConnectionInfo, WeightReceiver, WeightSender

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2,
                       reason="the nccl path needs two CUDA devices"),
]


def _weights(version: int, device: str) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(version)
    return {"w": torch.randn(256, 128, generator=gen).to(device),
            "b": torch.randn(128, generator=gen).to(device).half(),
            "n": torch.tensor(version).to(device)}


def gpu_collector(info: ConnectionInfo, cid: int, out: Connection, cmds: Connection) -> None:
    torch.cuda.set_device(1)
    weights = _weights(-1, "cuda:1")
    receiver = WeightReceiver(weights, info, cid, timeout=60)
    try:
        version = receiver.connect(timeout=120)
        while version is not None and version < 3:
            version = receiver.receive_weights(timeout=60)
        want = _weights(3, "cuda:1")
        same = all(torch.equal(weights[k], want[k]) for k in want)
        on_gpu = all(t.device.type == "cuda" for t in weights.values())
        out.send(("applied", cid, version, (same, on_gpu), os.getpid()))
    finally:
        receiver.close()


def test_nccl_link_moves_cuda_weights_bit_exact() -> None:
    torch.cuda.set_device(0)
    weights = _weights(0, "cuda:0")
    cluster = Cluster()
    try:
        with WeightSender(weights, 1, backend="nccl", timeout=60) as sender:
            cluster.start(sender.connection_info, 0, gpu_collector)
            sender.connect(timeout=180)
            for version in (1, 2, 3):
                with torch.no_grad():
                    for name, value in _weights(version, "cuda:0").items():
                        weights[name].copy_(value)
                sender.send_weights_async()
                assert sender.wait_ack(timeout=60).acked == (0,)
            msg = cluster.applied(0, 3, timeout=120)
            assert msg[2] == 3 and msg[3] == (True, True)
    finally:
        cluster.shutdown()
