"""Collectors that know only the learner's address and their id from the environment
(torchrun-style launches): the rest of the connection info comes from the store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from weight_sync import ConnectionInfo, WeightSender, WeightSyncTimeout, info_from_env
from weight_sync.control.discovery import (
    collector_id_from_env,
    env_for_collectors,
    info_from_address,
)
from weight_sync.errors import ConfigError

CHILD = """
import json, torch
from weight_sync import WeightReceiver, info_from_env
from weight_sync.control.discovery import collector_id_from_env
weights = {"w": torch.zeros(4, 3), "n": torch.tensor(0)}
receiver = WeightReceiver(weights, info_from_env(timeout=60), collector_id_from_env())
first = receiver.connect(timeout=60)
second = receiver.receive_weights(timeout=60)
print(json.dumps({"id": receiver.collector_id, "versions": [first, second],
                  "w": weights["w"].tolist(), "n": int(weights["n"])}), flush=True)
receiver.close()
"""


def _weights(value: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((4, 3), float(value)), "n": torch.tensor(int(value))}


def test_collector_id_from_env() -> None:
    assert collector_id_from_env({"WEIGHT_SYNC_COLLECTOR_ID": "3", "RANK": "7"}) == 3
    assert collector_id_from_env({"RANK": "7"}) == 7
    with pytest.raises(ConfigError, match="neither WEIGHT_SYNC_COLLECTOR_ID nor RANK"):
        collector_id_from_env({})
    with pytest.raises(ConfigError, match="got '-1'"):
        collector_id_from_env({"RANK": "-1"})


def test_address_errors_and_info_round_trip() -> None:
    with pytest.raises(ConfigError, match="WEIGHT_SYNC_ADDR is not set"):
        info_from_env({})
    for bad in ("learner", "learner:", ":29600", "learner:port"):
        with pytest.raises(ConfigError, match=f"got '{bad}'"):
            info_from_env({"WEIGHT_SYNC_ADDR": bad})
    info = ConnectionInfo(host="::1", port=29600, name="actor",
                          num_collectors=2, max_collectors=4)
    assert ConnectionInfo.from_json(info.to_json()) == info
    assert env_for_collectors(info) == {"WEIGHT_SYNC_ADDR": "[::1]:29600",
                                        "WEIGHT_SYNC_NAME": "actor"}
    with pytest.raises(ConfigError, match="not a ConnectionInfo"):
        ConnectionInfo.from_json('{"host": "x"}')


def test_unknown_stream_name_times_out_naming_it() -> None:
    with WeightSender(_weights(0), 1) as sender, \
            pytest.raises(WeightSyncTimeout, match="stream 'other'"):
        info_from_address("127.0.0.1", sender.connection_info.port, "other", timeout=1)


def test_collector_started_with_only_environment_variables() -> None:
    learner_weights = _weights(0)
    with WeightSender(learner_weights, 2, timeout=60) as sender:
        env = {**os.environ, **env_for_collectors(sender.connection_info),
               "PYTHONPATH": os.pathsep.join(sys.path)}
        children = [subprocess.Popen([sys.executable, "-c", CHILD], text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     env={**env, "RANK": str(rank)}) for rank in (0, 1)]
        try:
            sender.connect(timeout=120)
            learner_weights["w"].fill_(2.5)
            learner_weights["n"].fill_(2)
            sender.send_weights_async()
            with ThreadPoolExecutor(2) as pool:  # read both pipes at once
                outs = list(pool.map(lambda c: c.communicate(timeout=120), children))
            assert sender.wait_ack(timeout=60).acked == (0, 1)
        finally:
            for child in children:
                if child.poll() is None:
                    child.kill()
                child.wait(30)
    for rank, (child, (stdout, stderr)) in enumerate(zip(children, outs, strict=True)):
        assert child.returncode == 0, stderr[-2000:]
        got = json.loads(stdout.strip().splitlines()[-1])
        assert got == {"id": rank, "versions": [0, 1], "w": [[2.5] * 3] * 4, "n": 2}
