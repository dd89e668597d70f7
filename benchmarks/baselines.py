"""Comparison points for weight-sync: torchrl's scheme, raw gloo, and a memcpy.

Every transport measurement runs in real processes (``torch.multiprocessing``
spawn). A *round* is timed with ``time.perf_counter`` on the learner, from the
start of the send until every receiver has acknowledged; warmup rounds are run and
dropped. Every wait is bounded by ``timeout`` seconds, ports come from port 0, and
child processes are always joined (killed if they outlive the deadline).

Each ``measure_*`` function returns a dict with ``samples_s`` (per-round latencies),
``median_s``, ``p90_s``, ``mean_s``, ``min_s``, ``nbytes``, ``num_collectors``,
``gbps_payload`` (``nbytes / median``, GB/s), ``gbps_aggregate`` (``N * nbytes /
median``) and ``threads`` (``torch`` intra-op threads of the learner), plus the
extras documented on each function.
"""

from __future__ import annotations

import contextlib
import queue
import time
import traceback
from collections.abc import Iterator, Sequence
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

__all__ = ["measure_torchrl", "measure_raw_gloo", "measure_memcpy", "num_threads", "summarize",
           "fingerprint", "collect_results", "wait_up", "reap"]

try:
    from benchmarks import policies
except ImportError:  # run as a script from inside benchmarks/
    import policies  # type: ignore[no-redef,unused-ignore]

_MP = mp.get_context("spawn")
_PG_PREFIX = "torchrl_default_pg"
TORCHRL_METHOD = (
    "learner: DistributedWeightSyncScheme(backend='gloo', sync=True, timeout=T)."
    "init_on_sender(model_id='policy', num_workers=N, context=ctx) with ctx.policy the "
    "policy (as DistributedDataCollector does), connect(), then one round = "
    "scheme.send() (prepare_weights -> TensorDict.from_module, then per worker in turn "
    "DistributedTransport.send_weights_async: store.set NODE_r_in + per-tensor gloo "
    "TensorDict.send, then wait_ack: store.get NODE_r_out for each worker); "
    "workers: scheme.init_on_receiver(model_id='policy', context=ctx, worker_idx=r) "
    "+ connect(), after which the scheme's own background receiver thread "
    "(_background_receive_loop: store.get NODE_r_in, transport.receive_weights -> "
    "per-tensor recv + strategy.apply_weights, _send_ack) serves every round; ctx has "
    "no update_policy_weights_, so no collector-side cascade copy. The default gloo "
    "process group (world N+1) is initialised beforehand by this harness via "
    "init_process_group(store=PrefixStore(prefix, scheme's own TCPStore)) instead of "
    "the collector's tcp:// guessed port; the loop ends with scheme._send_instruction"
    "('stop'). Learner perturbs weights (untimed) before each round; worker threads=1."
)


def summarize(samples: Sequence[float], nbytes: int, n: int) -> dict[str, Any]:
    """Latency statistics and bandwidths of a list of per-round samples."""
    arr = np.asarray(samples, dtype=np.float64)
    median = float(np.median(arr))
    return {
        "samples_s": [float(x) for x in arr],
        "median_s": median,
        "p90_s": float(np.percentile(arr, 90)),
        "mean_s": float(arr.mean()),
        "min_s": float(arr.min()),
        "nbytes": float(nbytes),
        "num_collectors": float(n),
        "gbps_payload": nbytes / median / 1e9,
        "gbps_aggregate": n * nbytes / median / 1e9,
        "threads": float(torch.get_num_threads()),
    }


@contextlib.contextmanager
def num_threads(threads: int | None) -> Iterator[None]:
    """Set torch's intra-op thread count for the block, then restore it."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def fingerprint(module: nn.Module) -> list[int]:
    """Exact, order-independent checksum per leaf: integer sum of the raw bits."""
    named = list(module.named_parameters()) + list(module.named_buffers())
    out = []
    for _, tensor in sorted(named, key=lambda kv: kv[0]):
        flat = tensor.detach().contiguous().reshape(-1)
        raw = flat.view(torch.int32) if flat.element_size() == 4 else flat.view(torch.uint8)
        out.append(int(raw.to(torch.int64).sum()))
    return out


def collect_results(q: Any, n: int, timeout: float) -> dict[int, Any]:
    """Read one ``(status, idx, payload)`` message per worker; raise on error/timeout."""
    deadline = time.monotonic() + timeout
    results: dict[int, Any] = {}
    while len(results) < n:
        try:
            status, idx, payload = q.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            msg = f"only {len(results)}/{n} workers reported in {timeout}s"
            raise TimeoutError(msg) from None
        if status != "ok":
            raise RuntimeError(f"worker {idx} failed:\n{payload}")
        results[idx] = payload
    return results


def wait_up(q: Any, procs: Sequence[Any], timeout: float) -> None:
    """Wait until every worker process put ``("up", idx, None)`` on ``q``, so that a
    learner only starts its bounded connect once its workers exist.

    Raises:
        RuntimeError: a worker reported an error, or exited (a script without a
            ``__main__`` guard, an import error), before it was up; names it.
        TimeoutError: not every worker was up within ``timeout``.
    """
    deadline = time.monotonic() + timeout
    up: set[int] = set()
    while len(up) < len(procs):
        try:  # short gets: a dead worker is seen within a fraction of a second
            status, idx, payload = q.get(timeout=min(0.2, max(deadline - time.monotonic(), 0)))
        except queue.Empty:
            gone = {i: p.exitcode for i, p in enumerate(procs)
                    if i not in up and p.exitcode is not None}
            if gone:
                raise RuntimeError(f"worker process(es) exited before they were up "
                                   f"(id: exit code) {gone}") from None
            if time.monotonic() >= deadline:
                missing = sorted(set(range(len(procs))) - up)
                raise TimeoutError(f"workers {missing} not up within {timeout}s") from None
            continue
        if status != "up":
            raise RuntimeError(f"worker {idx} failed before it was up:\n{payload}")
        up.add(idx)


def reap(procs: Sequence[Any], timeout: float) -> None:
    """Join every process within ``timeout`` seconds; kill the ones still alive."""
    deadline = time.monotonic() + timeout
    for proc in procs:
        if proc.pid is not None:
            proc.join(max(0.0, deadline - time.monotonic()))
    for proc in procs:
        if proc.is_alive():
            proc.kill()
            proc.join(5.0)


class _Context:
    """Stands in for a collector: the scheme resolves its model as ``context.policy``."""

    def __init__(self, policy: nn.Module) -> None:
        self.policy = policy


def _torchrl_worker(
    rank: int, scheme: Any, spec: tuple[int, str, int, int], world: int, timeout: float, q: Any
) -> None:
    """Receiver process: torchrl scheme + its background receiver thread.

    ``spec`` is ``(params, kind, seed, total_rounds)``; every wait inside a round is
    bounded by ``timeout``, so the whole loop is bounded by ``timeout * (total + 2)``.
    """
    torch.set_num_threads(1)
    td = timedelta(seconds=timeout)
    try:
        policy = policies.make_policy(*spec[:3])
        ctx = _Context(policy)
        scheme.init_on_receiver(model_id="policy", context=ctx, worker_idx=rank)
        info = scheme._store_info
        pg_store = dist.TCPStore(info["host"], info["port"], is_master=False, timeout=td)
        dist.init_process_group(
            "gloo",
            store=dist.PrefixStore(_PG_PREFIX, pg_store),
            rank=rank,
            world_size=world,
            timeout=td,
        )
        scheme.connect()  # initial weights, then starts the background receiver thread
        thread = scheme._background_thread
        thread.join(timeout * (spec[3] + 2))  # ends on the learner's "stop"
        if thread.is_alive():
            raise TimeoutError("torchrl background receiver did not stop")
        with torch.no_grad():
            q.put(("ok", rank, fingerprint(ctx.policy)))
    except BaseException:
        q.put(("error", rank, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def measure_torchrl(
    params: int,
    kind: str = "wide",
    num_collectors: int = 1,
    rounds: int = 30,
    warmup: int = 3,
    timeout: float = 60.0,
    seed: int = 0,
    threads: int | None = 1,
) -> dict[str, Any]:
    """Time torchrl's ``DistributedWeightSyncScheme`` pushing a policy to N workers.

    A round is ``scheme.send()``: send to every worker in turn plus all acks (see
    ``TORCHRL_METHOD``). Needs the default process group to be free in this process
    (it is created and destroyed here).

    Returns:
        The common keys plus ``params``, ``leaves``, ``kind``, ``method``,
        ``setup_s`` (spawn to connected) and ``correct`` (every worker's weights
        bit-equal to the learner's after the last round).
    """
    from torchrl.weight_update import DistributedWeightSyncScheme

    if dist.is_initialized():
        raise RuntimeError("measure_torchrl needs the default process group to be free")
    td = timedelta(seconds=timeout)
    with num_threads(threads):
        policy = policies.make_policy(params, kind, seed)
        ctx = _Context(policy)
        scheme = DistributedWeightSyncScheme(backend="gloo", sync=True, timeout=timeout)
        scheme.init_on_sender(model_id="policy", num_workers=num_collectors, context=ctx)
        q = _MP.Queue()
        world = num_collectors + 1
        procs = [
            _MP.Process(
                target=_torchrl_worker,
                args=(rank, scheme, (params, kind, seed, warmup + rounds), world, timeout, q),
                daemon=True,
            )
            for rank in range(1, world)
        ]
        t_setup, ok = time.perf_counter(), False
        try:
            for proc in procs:
                proc.start()
            dist.init_process_group(
                "gloo",
                store=dist.PrefixStore(_PG_PREFIX, scheme._store),
                rank=0,
                world_size=world,
                timeout=td,
            )
            scheme.connect()
            setup_s = time.perf_counter() - t_setup
            samples = []
            with torch.no_grad():
                for r in range(warmup + rounds):
                    for p in policy.parameters():  # the "optimizer step", untimed
                        p.add_(1.0 / 1024)
                    t0 = time.perf_counter()
                    scheme.send()
                    dt = time.perf_counter() - t0
                    if r >= warmup:
                        samples.append(dt)
                expected = fingerprint(policy)
            scheme._send_instruction("stop")
            results = collect_results(q, num_collectors, timeout)
            ok = True
        finally:
            reap(procs, timeout if ok else 1.0)
            scheme.shutdown()
            if dist.is_initialized():
                dist.destroy_process_group()
        out = summarize(samples, policies.count_bytes(policy), num_collectors)
    out.update(
        params=float(policies.count_params(policy)),
        leaves=float(policies.count_leaves(policy)),
        kind=kind,
        method=TORCHRL_METHOD,
        setup_s=setup_s,
        correct=all(fp == expected for fp in results.values()),
    )
    return out


def _gloo_worker(idx: int, port: int, nbytes: int, total: int, timeout: float, q: Any) -> None:
    """Receiver process: recv the flat buffer, ack with its last byte, ``total`` times."""
    torch.set_num_threads(1)
    td = timedelta(seconds=timeout)
    try:
        store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=td)
        pg: Any = dist.ProcessGroupGloo(dist.PrefixStore(f"pair{idx}", store), 1, 2, td)
        buf = torch.empty(nbytes, dtype=torch.uint8)
        ack = torch.zeros(1, dtype=torch.int32)
        for _ in range(total):
            pg.recv([buf], 0, 0).wait(td)
            ack[0] = int(buf[-1])
            pg.send([ack], 0, 1).wait(td)
        q.put(("ok", idx, None))
    except BaseException:
        q.put(("error", idx, traceback.format_exc()))


def _raw_gloo_once(
    nbytes: int, n: int, rounds: int, warmup: int, timeout: float
) -> tuple[list[float], bool, float]:
    """One raw-gloo run with ``n`` receivers: (samples, correct, setup seconds)."""
    td = timedelta(seconds=timeout)
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=td)
    q = _MP.Queue()
    total = warmup + rounds
    procs = [
        _MP.Process(
            target=_gloo_worker, args=(i, store.port, nbytes, total, timeout, q), daemon=True
        )
        for i in range(n)
    ]
    t_setup, ok = time.perf_counter(), False
    try:
        for proc in procs:
            proc.start()
        pgs: list[Any] = [
            dist.ProcessGroupGloo(dist.PrefixStore(f"pair{i}", store), 0, 2, td) for i in range(n)
        ]
        setup_s = time.perf_counter() - t_setup
        buf = torch.randint(0, 256, (nbytes,), dtype=torch.uint8)
        acks = [torch.zeros(1, dtype=torch.int32) for _ in range(n)]
        samples, correct = [], True
        for r in range(total):
            buf[-1] = r % 256  # untimed: mark the round so the ack proves delivery
            t0 = time.perf_counter()
            ack_works = [pg.recv([acks[i]], 1, 1) for i, pg in enumerate(pgs)]
            send_works = [pg.send([buf], 1, 0) for pg in pgs]
            for work in send_works + ack_works:
                work.wait(td)
            dt = time.perf_counter() - t0
            correct = correct and all(int(a[0]) == r % 256 for a in acks)
            if r >= warmup:
                samples.append(dt)
        collect_results(q, n, timeout)
        ok = True
    finally:
        reap(procs, timeout if ok else 1.0)
    return samples, correct, setup_s


def measure_raw_gloo(
    nbytes: int,
    num_collectors: int = 1,
    rounds: int = 30,
    warmup: int = 3,
    timeout: float = 60.0,
    threads: int | None = 1,
    include_n1: bool = True,
) -> dict[str, Any]:
    """Time one flat ``uint8`` tensor of ``nbytes`` sent over gloo to N receivers.

    Standalone ``ProcessGroupGloo`` pairs (one per receiver, ``PrefixStore`` on a
    port-0 ``TCPStore`` of the learner, no ``init_process_group``). A round: post an
    ack recv per pair, ``send`` the buffer on every pair, wait all sends and acks.
    The ack is a 1-element int32 gloo send on the same pair (tag 1) carrying the
    buffer's last byte, checked against the round's mark.

    Returns:
        The common keys plus ``method``, ``setup_s``, ``correct`` and, when
        ``include_n1`` and N > 1, the same statistics for N=1 under ``n1_*`` keys.
    """
    with num_threads(threads):
        samples, correct, setup_s = _raw_gloo_once(nbytes, num_collectors, rounds, warmup, timeout)
        out = summarize(samples, nbytes, num_collectors)
        out.update(
            method="ProcessGroupGloo pairs; learner send() to all then waits; "
            "ack = 1-element int32 gloo send back on the same pair",
            setup_s=setup_s,
            correct=correct,
        )
        if include_n1 and num_collectors != 1:
            samples1, correct1, _ = _raw_gloo_once(nbytes, 1, rounds, warmup, timeout)
            out.update({f"n1_{k}": v for k, v in summarize(samples1, nbytes, 1).items()})
            out["n1_correct"] = correct1
    return out


def measure_memcpy(
    nbytes: int, rounds: int = 30, warmup: int = 3, threads: int | None = 1
) -> dict[str, Any]:
    """Time an in-process ``copy_`` of ``nbytes`` between two preallocated uint8 tensors."""
    with num_threads(threads):
        src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8)
        dst = torch.zeros(nbytes, dtype=torch.uint8)
        samples = []
        for r in range(warmup + rounds):
            t0 = time.perf_counter()
            dst.copy_(src)
            dt = time.perf_counter() - t0
            if r >= warmup:
                samples.append(dt)
        out = summarize(samples, nbytes, 1)
    out["correct"] = bool(torch.equal(src, dst))
    return out


def _strip(result: dict[str, Any]) -> dict[str, Any]:
    """Drop sample lists and the long method string for compact printing."""
    return {k: v for k, v in result.items() if not k.endswith("samples_s") and k != "method"}


if __name__ == "__main__":
    import argparse
    import json

    parser = argparse.ArgumentParser(description="Quick baseline run; prints JSON.")
    parser.add_argument("--params", type=int, default=1_000_000)
    parser.add_argument("--kind", default="wide", choices=["wide", "deep"])
    parser.add_argument("--n", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--samples", action="store_true", help="keep per-round samples")
    args = parser.parse_args()
    nbytes = policies.count_bytes(policies.make_policy(args.params, args.kind))
    report: dict[str, Any] = {"params": args.params, "kind": args.kind, "nbytes": nbytes}
    show = (lambda r: r) if args.samples else _strip
    for n in args.n:
        report[f"torchrl_n{n}"] = show(
            measure_torchrl(args.params, args.kind, n, args.rounds, args.warmup, args.timeout)
        )
        report[f"raw_gloo_n{n}"] = show(
            measure_raw_gloo(nbytes, n, args.rounds, args.warmup, args.timeout, include_n1=False)
        )
    report["memcpy"] = show(measure_memcpy(nbytes, args.rounds, args.warmup))
    report["torchrl_method"] = TORCHRL_METHOD
    print(json.dumps(report, indent=2))
