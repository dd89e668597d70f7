"""Cost of returning a collector's batch to the learner, four ways, in the same run.

A collector process (spawn, 1 thread) sends ``--batches`` copies of a real CartPole batch
(``weight_sync.collectors.task.collect``, ``--frames`` frames) over a ``multiprocessing.Pipe``, one
every ``--pace-ms`` (so the figures are per-batch costs, not a backlog); the learner
(1 thread) receives and decodes each. Modes, alternated per round:

* ``codec``: ``weight_sync.collectors.batch_messages.encode_message`` + ``send_bytes`` (what the
  collectors use);
* ``shm_leaves``: ``send(td)``: torch's reductions put every leaf in its own
  shared-memory segment and pass its descriptor;
* ``shm_consolidated``: ``send(td.consolidate())``: one segment per batch;
* ``pickle``: ``send_bytes(pickle.dumps(td.consolidate()))`` with the standard pickler.

Reported per mode: the collector's time to encode + send, the learner's time to receive
+ decode, and the end-to-end latency (stamp before encode -> decoded), median and p90.

    python -m benchmarks.batch_messages --frames 256 --batches 300 --json-out out.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import pickle
import time
from multiprocessing.connection import Connection
from typing import Any

import torch
from weight_sync.collectors.batch_messages import decode_message, encode_message
from weight_sync.collectors.task import collect, make_env, make_policy

MODES = ("codec", "shm_leaves", "shm_consolidated", "pickle")


def _send(conn: Connection, mode: str, td: Any) -> None:
    if mode == "codec":
        conn.send_bytes(encode_message("batch", {"t0": time.perf_counter()}, td))
    elif mode == "shm_leaves":
        conn.send(td)
    elif mode == "shm_consolidated":
        conn.send(td.consolidate(metadata=True))
    else:
        conn.send_bytes(pickle.dumps(td.consolidate(metadata=True)))


def _recv(conn: Connection, mode: str) -> Any:
    if mode == "codec":
        return decode_message(conn.recv_bytes())[1]
    if mode == "pickle":
        return pickle.loads(conn.recv_bytes())
    return conn.recv()


def _producer(conn: Connection, mode: str, batch: Any, n: int, pace: float,
              done: Any) -> None:
    torch.set_num_threads(1)
    costs = []
    for _ in range(n):
        td = batch.clone()  # a fresh batch each time, as a collector makes
        td["t0"] = torch.full(td.batch_size, time.perf_counter(), dtype=torch.float64)
        start = time.perf_counter()
        _send(conn, mode, td)
        costs.append(time.perf_counter() - start)
        time.sleep(pace)
    conn.send(("costs", costs))
    done.wait(60)  # shared-memory modes: segments must outlive the reads


def _q(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def measure(mode: str, batch: Any, n: int, pace: float) -> dict[str, float]:
    """One mode, one producer process: per-batch costs in µs (median and p90)."""
    ctx = mp.get_context("spawn")
    reader, writer = ctx.Pipe(duplex=False)
    done = ctx.Event()
    proc = ctx.Process(target=_producer, args=(writer, mode, batch, n, pace, done))
    proc.start()
    writer.close()
    recv, lat = [], []
    for _ in range(n):
        if not reader.poll(60):
            raise TimeoutError(f"{mode}: no batch within 60 s")
        start = time.perf_counter()
        td = _recv(reader, mode)
        float(td["observation"].sum())
        end = time.perf_counter()
        recv.append(end - start)
        lat.append(end - float(td["t0"][0]))
    _, send = reader.recv()
    done.set()
    proc.join(30)
    return {f"{name}_{tag}_us": _q(vals, q) * 1e6
            for name, vals in (("send", send), ("recv", recv), ("latency", lat))
            for tag, q in (("p50", 0.5), ("p90", 0.9))}


def main(argv: list[str] | None = None) -> int:
    """Run every mode ``--rounds`` times, alternating, and print a table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=256)
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--pace-ms", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    batch, _ = collect(make_env(0), make_policy(), args.frames)
    nbytes = sum(t.numel() * t.element_size() for t in batch.values(True, True))
    print(f"batch: {args.frames} frames, {len(list(batch.keys(True, True)))} leaves, "
          f"{nbytes} bytes")
    results: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
    for _ in range(args.rounds):
        for mode in MODES:
            results[mode].append(measure(mode, batch, args.batches, args.pace_ms / 1e3))
    print(f"{'mode':18s} {'send p50/p90 µs':>18s} {'recv p50/p90 µs':>18s} "
          f"{'latency p50/p90 µs':>20s}")
    for mode, runs in results.items():
        for r in runs:
            print(f"{mode:18s} {r['send_p50_us']:8.0f}/{r['send_p90_us']:<8.0f} "
                  f"{r['recv_p50_us']:9.0f}/{r['recv_p90_us']:<8.0f} "
                  f"{r['latency_p50_us']:10.0f}/{r['latency_p90_us']:<8.0f}")
    if args.json_out:
        with open(args.json_out, "w") as fh:
            json.dump({"frames": args.frames, "nbytes": nbytes, "results": results}, fh,
                      indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
