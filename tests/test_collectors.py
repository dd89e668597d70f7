"""The collector group with real processes: lifecycle, version tags, failures, the demo.

Collectors are real spawned processes running the CartPole task. Every wait is bounded
(group timeouts, ``join`` timeouts, ``pidfd`` waits); nothing here sleeps to synchronise
and nothing asserts on speed: a failure must surface as the *typed* error, which is
raised before any timeout would fire.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from harness import process_gone
from tensordict import TensorDict
from weight_sync.collectors import (
    CHECKSUM_KEY,
    VERSION_KEY,
    WORKER_KEY,
    CollectorCrashed,
    CollectorDied,
    CollectorError,
    CollectorGroup,
    CollectorTimeout,
    policy_checksum,
)
from weight_sync.collectors.batch_messages import decode_message, encode_message
from weight_sync.collectors.demo import main as demo_main
from weight_sync.collectors.task import collect, make_env, make_policy

FRAMES = 64
RESTART_S = 90.0  # a restarted collector back with new weights: a hang guard
TIMEOUTS = dict(connect_timeout=60.0, batch_timeout=60.0, shutdown_timeout=10.0)


# -- factories run inside the collector processes (module level: picklable) ----------------
def crashing_env(seed: int) -> Any:
    """CartPole whose collector id rides along (the env seed is seed + 1000 * id)."""
    env = make_env(seed)
    env.test_worker_id = seed // 1000
    return env


_calls = {"n": 0}


def crash_on_second_batch(env: Any, policy: Any, frames: int, state: Any) -> Any:
    """``collect`` for collector 0; collector 1 raises on its second batch."""
    _calls["n"] += 1
    if env.test_worker_id == 1 and _calls["n"] >= 2:
        raise RuntimeError("boom from the test collector")
    return collect(env, policy, frames, state)


def never_returns(env: Any, policy: Any, frames: int, state: Any) -> Any:
    """A rollout stuck in the environment: it ignores the stop signal."""
    threading.Event().wait(600)


def broken_policy() -> Any:
    raise ValueError("cannot build this policy")


# -- helpers -----------------------------------------------------------------------------


def _perturb(policy: torch.nn.Module, step: int) -> None:
    gen = torch.Generator().manual_seed(step)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))


def _group(policy: torch.nn.Module, **kwargs: Any) -> CollectorGroup:
    opts: dict[str, Any] = dict(num_collectors=2, frames_per_batch=FRAMES, seed=0,
                                collect_fn=collect, **TIMEOUTS)
    opts.update(kwargs)
    return CollectorGroup(policy, opts.pop("env_factory", make_env),
                          opts.pop("policy_factory", make_policy), **opts)


# -- tests -------------------------------------------------------------------------------
def test_codec_round_trip() -> None:
    td = TensorDict({
        "obs": torch.randn(5, 3), "flag": torch.tensor([True, False, True, True, False]),
        "nested": {"count": torch.arange(5, dtype=torch.int64), "half": torch.ones(5, 2).half(),
                   "empty": torch.empty(5, 0)},
    }, batch_size=[5])
    header, out = decode_message(bytes(encode_message("batch", {"worker_id": 3}, td)))
    assert header == {"kind": "batch", "worker_id": 3}
    assert out is not None and out.batch_size == td.batch_size
    for key, value in td.items(include_nested=True, leaves_only=True):
        assert out[key].dtype == value.dtype and out[key].shape == value.shape
        assert torch.equal(out[key], value)
    assert decode_message(bytes(encode_message("error", {"traceback": "tb"}))) == (
        {"kind": "error", "traceback": "tb"}, None)


def test_lifecycle_version_tags_and_clean_shutdown() -> None:
    torch.manual_seed(0)
    policy = make_policy()
    checksums = {0: policy_checksum(policy)}
    group = _group(policy, record_checksum=True)
    with group:
        pids = group.pids
        assert len(pids) == 2 and all(pid is not None for pid in pids)
        seen_workers = set()
        for step, batch in enumerate(group):
            assert batch.batch_size == torch.Size([FRAMES])
            versions, sums = batch[VERSION_KEY].tolist(), batch[CHECKSUM_KEY].tolist()
            # Every step says which weights acted, and the worker really held them.
            for version, checksum in zip(versions, sums, strict=True):
                assert version in checksums and checksum == checksums[version]
            record = group.batch_records[-1]
            assert record.version_min == min(versions) and record.version_max == max(versions)
            assert record.staleness == group.version - min(versions) >= 0
            seen_workers.update(batch[WORKER_KEY].unique().tolist())
            _perturb(policy, step)
            result = group.update_weights(timeout=30)
            assert result.complete and result.version == group.version == step + 1
            checksums[group.version] = policy_checksum(policy)
            if step >= 7 and seen_workers == {0, 1}:
                break
            assert step < 40, "both collectors should deliver within a few batches"
        stats = group.stats
        assert [r.version for r in stats.records][-1] == group.version
        assert all(r.nbytes > 0 and r.round_s > 0 and r.num_collectors == 2
                   for r in stats.records)
        summary = group.summary()
        assert summary["batches"] == len(group.batch_records) >= 8
        assert summary["staleness_max"] >= 0 and summary["p99_s"] >= summary["p50_s"]
    # Closed: every collector stopped cleanly (exit code 0, not terminated), none left.
    assert [w.exitcode for w in group.workers] == [0, 0]
    assert all(process_gone(pid) for pid in pids)
    with pytest.raises(CollectorError, match="after close"):
        group.next_batch(1.0)


def test_poll_between_batches_gives_one_version_per_batch() -> None:
    policy = make_policy()
    with _group(policy, num_collectors=1, poll_every_step=False) as group:
        for step, batch in zip(range(4), group, strict=False):
            assert batch[VERSION_KEY].unique().numel() == 1
            _perturb(policy, step)
            group.update_weights(timeout=30)


def test_worker_that_raises_is_reported_with_its_traceback() -> None:
    policy = make_policy()
    group = _group(policy, env_factory=crashing_env, collect_fn=crash_on_second_batch)
    with group, pytest.raises(CollectorCrashed) as info:
        for _ in range(50):  # collector 1 raises on its 2nd batch: long before 50
            next(group)
            group.update_weights(timeout=30)
    err = info.value
    assert err.worker_id == 1 and "collector 1" in str(err)
    assert err.traceback is not None and "boom from the test collector" in err.traceback
    assert "crash_on_second_batch" in err.traceback
    assert group.workers[1].exitcode == 1
    assert all(process_gone(pid) for pid in group.pids)


def test_worker_killed_is_reported_by_name() -> None:
    policy = make_policy()
    with _group(policy) as group:
        next(group)
        victim = group.workers[0]
        os.kill(victim.pid, signal.SIGKILL)  # type: ignore[arg-type]
        victim.join(30)
        with pytest.raises(CollectorDied) as info:
            next(group)
        assert info.value.worker_id == 0 and info.value.exitcode == -signal.SIGKILL
        assert "collector 0" in str(info.value) and "SIGKILL" in str(info.value)
        with pytest.raises(CollectorDied):  # the failure is sticky
            group.update_weights(timeout=30)
    assert all(process_gone(pid) for pid in group.pids)


def test_exception_in_learner_stops_every_collector() -> None:
    group = _group(make_policy())
    with pytest.raises(KeyboardInterrupt), group:  # as Ctrl-C in the learner would
        next(group)
        raise KeyboardInterrupt
    assert all(process_gone(pid) for pid in group.pids)


def test_collector_failing_at_start_up_is_reported() -> None:
    group = _group(make_policy(), policy_factory=broken_policy)
    with pytest.raises(CollectorCrashed, match="cannot build this policy") as info, group:
        pass
    assert info.value.worker_id in (0, 1)
    assert all(process_gone(pid) for pid in group.pids)


def test_no_batch_times_out_and_stuck_collectors_are_terminated() -> None:
    group = _group(make_policy(), collect_fn=never_returns, shutdown_timeout=1.0)
    with group:
        with pytest.raises(CollectorTimeout, match="no batch"):
            group.next_batch(timeout=2.0)
        assert not any(process_gone(pid) for pid in group.pids)
    # Stuck in their rollouts, they ignored the stop signal: close() terminated them.
    codes = [w.exitcode for w in group.workers]
    assert set(codes) <= {0, -signal.SIGTERM} and -signal.SIGTERM in codes
    assert all(process_gone(pid) for pid in group.pids)


def _learner_then_die(pids_out: Any) -> None:
    group = _group(make_policy()).start()
    next(group)
    pids_out.send(group.pids)
    os.kill(os.getpid(), signal.SIGKILL)  # no close(), no atexit: collectors are orphans


def test_collectors_exit_when_the_learner_dies() -> None:
    ctx = mp.get_context("spawn")
    reader, writer = ctx.Pipe(duplex=False)
    learner = ctx.Process(target=_learner_then_die, args=(writer,))
    learner.start()
    writer.close()
    assert reader.poll(120), "the learner never reported its collectors"
    pids = reader.recv()
    learner.join(30)
    assert learner.exitcode == -signal.SIGKILL
    assert all(process_gone(pid, timeout=30) for pid in pids), "collectors outlived their learner"


def _learner_then_freeze(pids_out: Any) -> None:
    group = _group(make_policy()).start()
    next(group)
    pids_out.send(group.pids)
    os.kill(os.getpid(), signal.SIGSTOP)  # frozen: no socket closes, its store answers nothing
    group.close()


def test_collectors_exit_when_the_learner_freezes() -> None:
    """A learner frozen with SIGSTOP (its process alive, a pid check would pass): its
    collectors see its heartbeat stop (``learner_timeout``, 10 s) and exit."""
    ctx = mp.get_context("spawn")
    reader, writer = ctx.Pipe(duplex=False)
    learner = ctx.Process(target=_learner_then_freeze, args=(writer,))
    learner.start()
    writer.close()
    try:
        assert reader.poll(120), "the learner never reported its collectors"
        pids = reader.recv()
        assert all(process_gone(pid, timeout=60) for pid in pids), \
            "collectors outlived their learner"
    finally:
        assert learner.pid is not None
        os.kill(learner.pid, signal.SIGKILL)
        os.kill(learner.pid, signal.SIGCONT)
        learner.join(30)
    assert learner.exitcode == -signal.SIGKILL


def test_demo_short_run_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "demo.json"
    code = demo_main(["--iterations", "3", "--frames-per-batch", "64", "--quiet",
                      "--json-out", str(out)])
    assert code == 0
    data = json.loads(out.read_text())
    rows = data["iterations"]
    assert [r["iteration"] for r in rows] == [1, 2, 3]
    for row in rows:
        for key in ("avg_return", "sync_latency_s", "staleness_mean", "frames", "fps",
                    "version"):
            assert key in row
        assert row["frames"] == 2 * 64 and row["version"] == row["iteration"]
    assert data["summary"]["iterations"] == 3 and data["summary"]["sync_rounds"] >= 3
    # no settings: both local collectors share the learner's /dev/shm, and say so
    assert data["summary"]["placements"]["shm"]["collectors"] == 2


def test_max_restarts_replaces_a_killed_collector_and_the_others_never_stop() -> None:
    torch.manual_seed(0)
    policy = make_policy()
    checksums = {0: policy_checksum(policy)}
    with _group(policy, record_checksum=True, max_restarts=1) as group:
        next(group)
        old_pid = group.workers[0].pid
        assert old_pid is not None
        os.kill(old_pid, signal.SIGKILL)
        rejoined = False
        # a hang guard: the new process imports torch and torchrl first (seconds), while
        # the other collector's batches keep the loop turning every few ms
        deadline = time.monotonic() + RESTART_S
        for step, batch in enumerate(group):
            # every step, before and after the restart, acted with weights it held
            for version, checksum in zip(batch[VERSION_KEY].tolist(),
                                         batch[CHECKSUM_KEY].tolist(), strict=True):
                assert checksum == checksums[version]
            record = group.batch_records[-1]
            if group.restarts and record.worker_id == 0 \
                    and record.version_min > group.restarts[0].learner_version:
                rejoined = True  # the new process got updates after it caught up
                break
            _perturb(policy, step)
            group.update_weights(timeout=30)  # never raises: the failure was restarted
            checksums[group.version] = policy_checksum(policy)
            assert time.monotonic() < deadline, \
                f"the restarted collector delivered nothing new within {RESTART_S}s"
        assert rejoined
        [restart] = group.restarts
        assert restart.worker_id == 0 and "SIGKILL" in restart.reason
        assert group.workers[0].pid != old_pid and process_gone(old_pid, timeout=10)
        # no restart left: the next death is raised, named
        os.kill(group.workers[0].pid, signal.SIGKILL)  # type: ignore[arg-type]
        with pytest.raises(CollectorDied) as info:
            for _ in range(80):
                next(group)
                group.update_weights(timeout=30)
        assert info.value.worker_id == 0
    assert all(process_gone(pid, timeout=10) for pid in group.pids)
