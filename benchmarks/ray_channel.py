"""Cost per batch of the collectors' channels: a local pipe vs Ray's object store vs the
network connection of a remote collector.

The same real CartPole batch (``weight_sync.collectors.task.collect``, ``--frames`` frames), encoded
with ``weight_sync.collectors.batch_messages.encode_message`` and stamped, is sent ``--batches``
times,
one every ``--pace-ms``, by

* ``pipe``: a spawned process over a ``multiprocessing.Pipe``, read by the learner with
  ``LocalLauncher.wait`` + ``LocalWorker.receive`` (what local collectors use);
* ``ray``: a Ray actor into the ``weight_sync.collectors.ray_launcher`` outbox, taken by the learner
  with ``RayLauncher.wait`` + ``RayWorker.receive`` (``next_messages`` results through the
  object store: what Ray collectors use);
* ``network``: a spawned process connected to a ``NetworkLauncher`` with
  ``weight_sync.collectors.remote.connect`` (over 127.0.0.1), read with ``NetworkLauncher.wait`` +
  ``RemoteWorker.receive`` (what ``python -m weight_sync.collectors.remote`` collectors use).

Both producers run one thread and send from a thread of their own process; the learner
runs one thread. Reported per channel, in µs: the end-to-end latency, median and p90
over the batches (stamp before encoding -> decoded in the learner; ``perf_counter`` is
the host's monotonic clock in both processes), and the learner process's CPU time per
batch (``process_time``: wait + receive + decode, Ray's own threads in the learner
included). The channels alternate ``--rounds`` times.

    python -m benchmarks.ray_channel --frames 256 --batches 200 --rounds 2
    python -m benchmarks.ray_channel --channels pipe network    # without Ray
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

# A local Ray on 127.0.0.1 only; read when Ray is first imported, which torchrl (imported
# by weight_sync.collectors.task) already does.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import torch
from weight_sync.collectors.batch_messages import decode_message, encode_message
from weight_sync.collectors.launcher import LocalLauncher, LocalWorker
from weight_sync.collectors.remote import NetworkLauncher, connect
from weight_sync.collectors.task import collect, make_env, make_policy
from weight_sync.collectors.worker import WorkerSpec

from weight_sync import ConnectionInfo

CHANNELS = ("pipe", "ray", "network")
_WAIT_S = 60.0  # per batch: a hang guard


def _batch(frames: int) -> Any:
    torch.manual_seed(0)
    batch, _ = collect(make_env(0), make_policy(), frames)
    return batch


def _produce(sink: Any, batch: Any, n: int, pace: float) -> None:
    for seq in range(n):
        sink.send_bytes(encode_message("batch", {"seq": seq, "t0": time.perf_counter()}, batch))
        time.sleep(pace)  # the pace of a collector, not a synchronisation
    sink.close()


def _pipe_producer(conn: Connection, batch: Any, n: int, pace: float) -> None:
    torch.set_num_threads(1)
    _produce(conn, batch, n, pace)


def _network_producer(address: tuple[str, int], batch: Any, n: int, pace: float) -> None:
    torch.set_num_threads(1)
    conn, _, _ = connect(address, 0, timeout=_WAIT_S)
    _produce(conn, batch, n, pace)


class _ProducerActor:
    """A stand-in collector actor: the launcher's outbox, fed by a producer thread."""

    def __init__(self, batch: Any, n: int, pace: float) -> None:
        from weight_sync.collectors.ray_actor import _Outbox

        torch.set_num_threads(1)
        self._outbox = _Outbox()
        self._args = (batch, n, pace)

    def run(self) -> int:
        thread = threading.Thread(target=_produce, args=(self._outbox, *self._args))
        thread.start()
        thread.join()
        return 0

    def next_messages(self) -> list[bytes | bytearray]:
        return self._outbox.take()

    def pid(self) -> int:
        return os.getpid()


def _drain(launcher: Any, worker: Any, n: int) -> dict[str, float]:
    latency: list[float] = []
    cpu0 = time.process_time()
    deadline = time.monotonic() + _WAIT_S
    while len(latency) < n:
        if not launcher.wait([worker], max(deadline - time.monotonic(), 0)) \
                and time.monotonic() > deadline:
            raise TimeoutError(f"no batch within {_WAIT_S:.0f} s after {len(latency)} of {n}")
        while (data := worker.receive()) is not None:
            deadline = time.monotonic() + _WAIT_S
            header, _ = decode_message(data)
            latency.append(time.perf_counter() - header["t0"])
    cpu = (time.process_time() - cpu0) / n
    return {"e2e_p50_us": _q(latency, 0.5), "e2e_p90_us": _q(latency, 0.9),
            "learner_cpu_us": cpu * 1e6}


def _q(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)] * 1e6


def measure(channel: str, batch: Any, n: int, pace: float) -> dict[str, float]:
    """One channel, one producer: per-batch costs in µs (``"ray"``: ``ray.init`` first)."""
    if channel == "network":
        launcher = NetworkLauncher(1)
        info = ConnectionInfo(host="127.0.0.1", port=1, name="unused", num_collectors=1)
        remote = launcher.launch(WorkerSpec(0, info, make_env, make_policy, collect), 2)
        ctx = mp.get_context("spawn")
        proc = ctx.Process(target=_network_producer, args=(launcher.address, batch, n, pace))
        proc.start()
        try:
            return _drain(launcher, remote, n)
        finally:
            proc.join(30)
            launcher.shutdown(5.0)
    if channel == "pipe":
        ctx = mp.get_context("spawn")
        reader, writer = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_pipe_producer, args=(writer, batch, n, pace))
        proc.start()
        writer.close()
        try:
            return _drain(LocalLauncher(), LocalWorker(0, proc, reader, None, None), n)
        finally:
            proc.join(30)
    import ray
    from weight_sync.collectors.ray_launcher import RayLauncher, RayWorker

    actor = ray.remote(_ProducerActor).options(max_concurrency=4, num_cpus=1).remote(
        batch, n, pace)
    worker = RayWorker(0, actor)
    try:
        return _drain(RayLauncher(), worker, n)
    finally:
        worker.close()


def run(channels: list[str], frames: int, batches: int, pace: float, rounds: int
        ) -> dict[str, list[dict[str, float]]]:
    """Each of ``channels`` ``rounds`` times, alternating; per channel, per round, µs."""
    torch.set_num_threads(1)
    batch = _batch(frames)
    if "ray" in channels:
        import ray

        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        results: dict[str, list[dict[str, float]]] = {c: [] for c in channels}
        for _ in range(rounds):
            for channel in channels:
                results[channel].append(measure(channel, batch, batches, pace))
    finally:
        if "ray" in sys.modules:
            sys.modules["ray"].shutdown()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=256)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--pace-ms", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--channels", nargs="+", choices=CHANNELS, default=list(CHANNELS))
    args = parser.parse_args(argv)
    results = run(args.channels, args.frames, args.batches, args.pace_ms / 1e3, args.rounds)
    size = len(encode_message("batch", {"seq": 0, "t0": 0.0}, _batch(args.frames)))
    print(f"batch: {args.frames} frames, {size} bytes encoded; {args.batches} batches "
          f"per round, one per {args.pace_ms} ms; µs, median of rounds' p50 / p90")
    print(f"{'channel':8s} {'end to end p50/p90':>20s} {'learner CPU/batch':>18s}")
    for channel, runs in results.items():
        def med(key: str, runs: list[dict[str, float]] = runs) -> float:
            return statistics.median(r[key] for r in runs)
        print(f"{channel:8s} {med('e2e_p50_us'):9.0f}/{med('e2e_p90_us'):<10.0f} "
              f"{med('learner_cpu_us'):14.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
