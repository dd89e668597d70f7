"""One rank of a data-parallel learner with its collectors, for real launchers.

Started by ``torch.distributed.run`` (``python -m torch.distributed.run
--nproc-per-node 2 tests/dp_job.py OUT_DIR``) or called by torchrunx
(:func:`run_rank`, with the process group already up). Each rank:

1. joins the process group with :class:`~weight_sync.training.DistributedHelper`, starts from
   its own random weights and takes rank 0's (``broadcast_parameters``);
2. serves its share of the collectors (``DataParallelSender``), which run as
   local processes under the test harness and report every version they apply with a
   digest of their weights;
3. for each step: a backward pass on this rank's own data, ``reduce_gradients`` (checked
   to be the mean of every rank's gradient), an SGD step, then a send and a wait for
   every collector's ack; it records whether the weights are bit-equal on every rank
   and whether each of its collectors applied this version with these very weights;
4. tries the bad inputs: a collector id out of range, and a second process with the
   id of a live collector.

Rank 0 alone writes the gathered record to ``OUT_DIR/result.json`` (and returns it
from :func:`run_rank`); the test asserts on it. Every wait is bounded.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch
from harness import pipe, spawn_collectors
from torch import nn

from weight_sync import ConnectionInfo, WeightReceiver, WeightSyncError
from weight_sync.errors import ClosedError, ConfigError, PeerGone
from weight_sync.training import DataParallelSender, DistributedHelper

NUM_COLLECTORS = 4
STEPS = 3
WAIT_S = 60.0  # a hang guard on a loaded 2-core machine, not a speed claim


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 2))


def digest(model: nn.Module) -> str:
    flat = torch.cat([p.detach().reshape(-1) for p in model.state_dict().values()])
    return hashlib.sha256(flat.numpy().tobytes()).hexdigest()


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


# -- collectors (module level: spawned by reference) --------------------------------
def collector(info: ConnectionInfo, local_id: int, global_id: int, out: Connection) -> int:
    """Apply every version and report it with the weights' digest; end on close."""
    torch.set_num_threads(1)
    torch.manual_seed(1000 + global_id)  # its own random start: the initial sync must fix it
    model = make_model()
    receiver = WeightReceiver(model, info, local_id, timeout=WAIT_S)
    applied = 0
    try:
        version: int | None = receiver.connect(timeout=WAIT_S)
        while True:
            if version is not None:
                out.send(("applied", global_id, version, digest(model)))
                applied += 1
            version = receiver.receive_weights(timeout=1)
    except (ClosedError, PeerGone):
        return applied
    finally:
        receiver.close()


def duplicate(info: ConnectionInfo, local_id: int, out: Connection) -> None:
    """Connect with the id of a live collector; report the typed error's class name."""
    torch.set_num_threads(1)
    receiver = WeightReceiver(make_model(), info, local_id, timeout=WAIT_S)
    try:
        receiver.connect(timeout=WAIT_S)
        out.send("connected")
    except WeightSyncError as exc:
        out.send(type(exc).__name__)
    finally:
        receiver.close()


# -- one rank ---------------------------------------------------------------------------
def _await_version(reader: Connection, procs: Any, version: int) -> tuple[Any, ...]:
    deadline = time.monotonic() + WAIT_S
    while True:
        msg = procs.get(reader, max(deadline - time.monotonic(), 0.001),
                        f"a collector applying version {version}")
        if msg[2] >= version:
            return tuple(msg)


def run_rank(out_dir: str | None = None) -> dict[str, Any] | None:
    """Run this rank; rank 0 returns (and writes) every rank's record."""
    torch.set_num_threads(1)
    helper = DistributedHelper(timeout=WAIT_S)
    rank = helper.get_rank()
    torch.manual_seed(helper.seed(0))  # every rank its own start...
    model = make_model()
    started_equal = _equal_on_all_ranks(helper, model)
    helper.broadcast_parameters(model)  # ...then rank 0's everywhere
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    record: dict[str, Any] = {"rank": rank, "world_size": helper.get_world_size(),
                              "started_equal": started_equal,
                              "equal_after_broadcast": _equal_on_all_ranks(helper, model),
                              "steps": []}
    with DataParallelSender(model, NUM_COLLECTORS, timeout=WAIT_S) as sender:
        served = sender.served()
        record["served"] = served
        readers, targets = [], []
        for local, gid in enumerate(served):
            reader, writer = pipe()
            readers.append(reader)
            targets.append((collector, (sender.assignment(gid)[0], local, gid, writer)))
        with spawn_collectors(targets, timeout=WAIT_S) as procs:
            sender.connect(timeout=WAIT_S)
            initial = [_await_version(r, procs, 0) for r in readers]
            record["initial_sync"] = all(m[3] == digest(model) for m in initial)
            for _ in range(STEPS):
                record["steps"].append(_step(helper, model, optimizer, sender, readers, procs))
            record["bad_input"] = _bad_input(sender, served)
            sender.close()  # collectors see ClosedError and return
        record["collector_applies"] = procs.results
    records = helper.all_gather_object(record)
    helper.cleanup()
    if not helper.is_writer():
        return None
    if out_dir is not None:
        Path(out_dir, "result.json").write_text(json.dumps(records, indent=1))
    return {"records": records}


def _equal_on_all_ranks(helper: DistributedHelper, model: nn.Module) -> bool:
    mine = _flat(list(model.state_dict().values()))
    return all(torch.equal(mine, theirs) for theirs in helper.all_gather(mine))


def _step(helper: DistributedHelper, model: nn.Module, optimizer: torch.optim.Optimizer,
          sender: Any, readers: list[Connection], procs: Any) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(helper.seed(100 + sender.version))
    x = torch.randn(32, 4, generator=gen)  # this rank's own data
    optimizer.zero_grad()
    model(x).pow(2).mean().backward()
    local = _flat([p.grad for p in model.parameters() if p.grad is not None])
    expected = torch.stack(helper.all_gather(local)).mean(0)
    helper.reduce_gradients(model.parameters())
    reduced = _flat([p.grad for p in model.parameters() if p.grad is not None])
    optimizer.step()
    version = sender.send_weights_async()
    result = sender.wait_ack(timeout=WAIT_S)
    applied = [_await_version(r, procs, version) for r in readers]
    return {
        "version": version,
        "grad_is_mean": bool(torch.allclose(reduced, expected, rtol=1e-6, atol=1e-7)),
        "grads_differed": not torch.equal(local, expected),
        "weights_equal": _equal_on_all_ranks(helper, model),
        "acked": list(result.acked) if result is not None else None,
        "applied": [[m[1], m[2], m[3] == digest(model)] for m in applied],
    }


def _bad_input(sender: Any, served: list[int]) -> dict[str, str]:
    found: dict[str, str] = {}
    try:
        sender.assignment(NUM_COLLECTORS)
        found["out_of_range"] = "accepted"
    except ConfigError as exc:
        found["out_of_range"] = f"ConfigError: {exc}"
    info, local = sender.assignment(served[0])
    reader, writer = pipe()
    with spawn_collectors([(duplicate, (info, local, writer))], timeout=WAIT_S) as procs:
        deadline = time.monotonic() + WAIT_S
        while not reader.poll(0):  # joins are handled inside the learner's calls
            if time.monotonic() > deadline:
                raise TimeoutError(f"no word from the duplicate of {served[0]} in {WAIT_S}s")
            procs.check()
            sender.wait_ack(timeout=0.5)
        found["duplicate"] = reader.recv()
    return found


if __name__ == "__main__":
    run_rank(sys.argv[1])
