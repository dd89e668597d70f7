"""The processes of ``benchmarks.fanout``, one per simulated host:
``python -m benchmarks.fanout_nodes <role> <json args>``.

Roles: weight-sync's learner and collector (``ws_learner`` / ``ws_collector``, any
transport), torchrl's ``DistributedWeightSyncScheme`` sender and workers
(``trl_learner`` / ``trl_worker``), and the plain TCP chain that is the wire's limit
(``chain_source`` / ``chain_hop``). Each prints JSON lines on stdout: what the
orchestrator waits for, then its report. Every wait is bounded by ``timeout``.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import socket
import sys
import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

torch.set_num_threads(1)

_PG_PREFIX = "torchrl_default_pg"
CHUNK = 4 << 20  # the TCP chain forwards 4 MB pieces, as DESIGN.md §3b measured


def emit(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


class Flat(nn.Module):
    """A policy of one flat parameter (the wire cost does not depend on the leaves)."""

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(numel))


def digest(module: nn.Module) -> str:
    h = hashlib.sha256()
    for p in module.state_dict().values():
        h.update(p.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _step(policy: Flat, r: int) -> None:
    with torch.no_grad():  # the "optimizer step", untimed
        policy.w.add_(float(r + 1))


# -- weight-sync ----------------------------------------------------------------------
def ws_learner(a: dict[str, Any]) -> None:
    """``a["transport"]`` ``None``: no settings but the learner's address (and the bound
    on waits), as a user who names no transport; else that transport, forced."""
    from weight_sync import WeightSender
    from weight_sync.config import RelayConfig

    policy = Flat(a["numel"])
    forced = {} if a["transport"] is None else {
        "transport": a["transport"], "liveness_timeout": a["timeout"],
        "relay": RelayConfig(**a.get("relay", {}))}
    with WeightSender(policy, a["n"], host=a["address"], timeout=a["timeout"],
                      **forced) as tx:
        emit(info=tx.connection_info.to_json())
        tx.connect(timeout=a["timeout"])
        rounds, inside = [], []
        for r in range(a["warmup"] + a["rounds"]):
            _step(policy, r)
            t0 = time.perf_counter()
            tx.send_weights_async()
            t1 = time.perf_counter()
            tx.wait_ack(timeout=a["timeout"])
            if r >= a["warmup"]:
                rounds.append(time.perf_counter() - t0)
                inside.append(t1 - t0)
        placements: dict[str, int] = {}
        for name in tx.transports.values():
            placements[name] = placements.get(name, 0) + 1
        fallbacks = (tx.learner_side("relay").fallbacks  # type: ignore[attr-defined]
                     if "relay" in placements else None)
        emit(report=True, rounds_s=rounds, async_s=inside, digest=digest(policy),
             version=tx.version, fallbacks=fallbacks, placements=placements)
        tx.close()  # now: the collectors report once they read the close


def ws_collector(a: dict[str, Any]) -> None:
    from weight_sync import ConnectionInfo, WeightReceiver
    from weight_sync.errors import ClosedError

    policy = Flat(a["numel"])
    info = ConnectionInfo.from_json(a["info"])
    with WeightReceiver(policy, info, a["cid"], timeout=a["timeout"]) as rx:
        version = rx.connect(timeout=a["timeout"])
        deadline = time.monotonic() + a["timeout"] * (a["last"] + 1)
        # Until the learner closes the stream, not just to the last version: a relay
        # that left early would send its children to the learner for that version.
        try:
            while time.monotonic() < deadline:
                got = rx.receive_weights(timeout=a["timeout"])
                version = got if got is not None else version
        except ClosedError:
            pass
        emit(report=True, version=version, digest=digest(policy))


# -- torchrl's DistributedWeightSyncScheme ------------------------------------------------
class _Context:
    """Stands in for a collector: the scheme resolves its model as ``context.policy``."""

    def __init__(self, policy: nn.Module) -> None:
        self.policy = policy


def trl_learner(a: dict[str, Any]) -> None:
    from torchrl.weight_update import DistributedWeightSyncScheme

    policy = Flat(a["numel"])
    ctx = _Context(policy)  # torchrl holds the context by weak reference: keep it alive
    scheme = DistributedWeightSyncScheme(backend="gloo", sync=True, timeout=a["timeout"])
    scheme.init_on_sender(model_id="policy", num_workers=a["n"], context=ctx)
    with open(a["scheme_file"], "wb") as f:
        pickle.dump(scheme, f)
    emit(ready=True)
    dist.init_process_group("gloo", store=dist.PrefixStore(_PG_PREFIX, scheme._store),
                            rank=0, world_size=a["n"] + 1,
                            timeout=timedelta(seconds=a["timeout"]))
    try:
        scheme.connect()
        rounds = []
        for r in range(a["warmup"] + a["rounds"]):
            _step(policy, r)
            t0 = time.perf_counter()
            scheme.send()
            if r >= a["warmup"]:
                rounds.append(time.perf_counter() - t0)
        scheme._send_instruction("stop")
        emit(report=True, rounds_s=rounds, digest=digest(policy))
    finally:
        dist.destroy_process_group()


def trl_worker(a: dict[str, Any]) -> None:
    with open(a["scheme_file"], "rb") as f:
        scheme = pickle.load(f)
    policy = Flat(a["numel"])
    ctx = _Context(policy)
    scheme.init_on_receiver(model_id="policy", context=ctx, worker_idx=a["rank"])
    info = scheme._store_info
    td = timedelta(seconds=a["timeout"])
    store = dist.TCPStore(info["host"], info["port"], is_master=False, timeout=td)
    dist.init_process_group("gloo", store=dist.PrefixStore(_PG_PREFIX, store),
                            rank=a["rank"], world_size=a["n"] + 1, timeout=td)
    try:
        scheme.connect()  # initial weights; its background thread serves every round
        thread = scheme._background_thread
        thread.join(a["timeout"] * (a["last"] + 2))  # ends on the learner's "stop"
        emit(report=True, stopped=not thread.is_alive(), digest=digest(ctx.policy))
    finally:
        dist.destroy_process_group()


# -- the wire's limit: a plain TCP chain ----------------------------------------------------
def _connect(address: str, port: int, timeout: float) -> socket.socket:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return socket.create_connection((address, port), timeout=timeout)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)  # the peer's listener is starting: retry, bounded


def chain_hop(a: dict[str, Any]) -> None:
    """Receive ``nbytes`` per round from upstream, forwarding each piece downstream as
    it arrives; the last hop answers the source with one byte per round."""
    server = socket.create_server((a["address"], a["port"]))
    server.settimeout(a["timeout"])
    emit(ready=True)
    upstream, _ = server.accept()
    upstream.settimeout(a["timeout"])
    down = _connect(a["next"], a["next_port"], a["timeout"])
    buf = memoryview(bytearray(CHUNK))
    for _ in range(a["rounds"]):
        got = 0
        while got < a["nbytes"]:
            n = upstream.recv_into(buf[:min(CHUNK, a["nbytes"] - got)])
            if n == 0:
                raise ConnectionError(f"upstream closed after {got} bytes")
            if not a["last"]:
                down.sendall(buf[:n])
            got += n
        if a["last"]:
            down.sendall(b"d")
    emit(report=True)


def chain_source(a: dict[str, Any]) -> None:
    done_server = socket.create_server((a["address"], a["done_port"]))
    done_server.settimeout(a["timeout"])
    emit(ready=True)
    first = _connect(a["first"], a["first_port"], a["timeout"])
    done, _ = done_server.accept()
    done.settimeout(a["timeout"])
    payload = memoryview(bytearray(a["nbytes"]))
    rounds = []
    for r in range(a["warmup"] + a["rounds"]):
        t0 = time.perf_counter()
        for off in range(0, a["nbytes"], CHUNK):
            first.sendall(payload[off:off + CHUNK])
        if done.recv(1) != b"d":
            raise ConnectionError("the chain's last hop closed")
        if r >= a["warmup"]:
            rounds.append(time.perf_counter() - t0)
    emit(report=True, rounds_s=rounds)


ROLES = {f.__name__: f for f in (ws_learner, ws_collector, trl_learner, trl_worker,
                                 chain_hop, chain_source)}

if __name__ == "__main__":
    ROLES[sys.argv[1]](json.loads(sys.argv[2]))
