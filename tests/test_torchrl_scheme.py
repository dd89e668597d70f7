"""weight-sync as a torchrl ``WeightSyncScheme`` inside torchrl's own collectors.

Real ``MultiSyncCollector`` / ``MultiAsyncCollector`` instances with 2 spawned worker
processes on CartPole (``GymEnv``), modelled on torchrl's collector tests
(policy-version, update-weights, async-collection, policy-factory). Each collector is
built once per module (start-up dominates: spawn + ``import torchrl``), so the tests of
one collector run in file order on it. Workers build their policy from a factory (their
own random initialisation): only the scheme can make them hold the learner's weights.

Worker weights are read with ``collector.state_dict()`` (torchrl asks each worker over
its pipe: the policy the worker's collector really uses). MultiAsync workers are never
asked while collecting (torchrl's own state_dict races with its async loop); there the
check is that every frame's logits are the ones the learner's weights of that frame's
``policy_version`` give.
"""

from __future__ import annotations

import copy
import json
import multiprocessing as mp
import os
import pickle
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from tensordict import TensorDict
from torchrl.collectors import Collector, MultiAsyncCollector, MultiSyncCollector
from torchrl.collectors.distributed import DistributedCollector
from weight_sync.collectors.demo import main as demo_main
from weight_sync.collectors.task import make_env, make_policy

from weight_sync import CollectorFailed, ConnectionInfo
from weight_sync.errors import ClosedError, ConfigError, ProtocolError
from weight_sync.torchrl import LearnerEnd, WeightSyncTorchRLScheme, WorkerEnd

#: The user-written transport of the example package docs/examples/socket-transport,
#: found through its entry point (installed by the README's test command).
SOCKET = "socket"

WORKERS = 2
# Typed errors must come well before this (same-host deaths are seen from the pid).
ERROR_BOUND_S = 10.0
# A hang guard, not a speed claim (a loaded 2-core machine took 5.06 s once): shutdown
# must end on its own bounds rather than a store timeout; benchmarks/torchrl_scheme.py
# records how long it takes (shutdown_s).
SHUTDOWN_BOUND_S = 20.0
SCHEME_TIMEOUTS = dict(timeout=30.0, connect_timeout=120.0, ack_timeout=30.0,
                       liveness_timeout=5.0)


# -- run inside the workers (module level: picklable by reference) ---------------------------
def make_cartpole() -> Any:
    return make_env(0)


def broken_cartpole() -> Any:
    raise RuntimeError("boom: this worker cannot build its env")


def buffered_policy() -> torch.nn.Module:
    """The demo's actor plus a float and an int64 buffer (parameters *and* buffers)."""
    policy = make_policy()
    policy.register_buffer("obs_scale", torch.rand(4))
    policy.register_buffer("updates", torch.zeros((), dtype=torch.int64))
    return policy


# -- helpers ---------------------------------------------------------------------------------
def perturb(policy: torch.nn.Module) -> None:
    """An optimizer-like in-place step on every parameter and buffer."""
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        policy.obs_scale.add_(1.0)
        policy.updates.add_(1)


def state(policy: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in policy.state_dict().items()}


def equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Bit for bit: same keys, dtypes, shapes and bytes."""
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def worker_states(collector: Any) -> list[dict[str, Any]]:
    sd = collector.state_dict()
    return [sd[f"worker{w}"] for w in range(WORKERS)]


def logits_of(weights: dict[str, torch.Tensor], observations: torch.Tensor) -> torch.Tensor:
    policy = buffered_policy()
    policy.load_state_dict(weights)
    with torch.no_grad():
        return policy(TensorDict({"observation": observations}, observations.shape[:-1])
                      )["logits"]


def assert_acted_with(batch: TensorDict, weights: dict[str, torch.Tensor]) -> None:
    """Every frame of ``batch`` was chosen by ``weights`` (up to float rounding of a
    batched vs a per-step forward; other weights differ by orders of magnitude more)."""
    torch.testing.assert_close(batch["logits"], logits_of(weights, batch["observation"]),
                               rtol=1e-5, atol=1e-5)


def assert_frames_honest(batch: TensorDict, by_version: dict[int, dict[str, torch.Tensor]]
                         ) -> None:
    """Every frame acted with the weights of its ``policy_version``, except that a frame
    within 2 steps of a version change may have acted with a version between its
    neighbours' tags: a worker applies in a background thread, so an apply can land
    between the policy call of a step and the env step that writes its tag (as with
    torchrl's own schemes)."""
    labels = batch["next", "policy_version"].reshape(-1).tolist()
    logits, obs = batch["logits"].reshape(-1, 2), batch["observation"].reshape(-1, 4)
    match = {v: torch.isclose(logits, logits_of(w, obs), rtol=1e-5, atol=1e-5).all(-1)
             for v, w in by_version.items()}
    n = len(labels)
    changes = [0, n] + [i for i in range(1, n) if labels[i] != labels[i - 1]]
    exact = 0
    for i, v in enumerate(labels):
        if match[v][i]:
            exact += 1
            continue
        lo = labels[i - 1] if i > 0 else min(by_version)
        hi = labels[i + 1] if i + 1 < n else max(by_version)
        allowed = [u for u in by_version if min(lo, v) <= u <= max(hi, v)]
        detail = f"frame {i} of {labels}: {({u: m.int().tolist() for u, m in match.items()})}"
        assert min(abs(i - c) for c in changes) <= 2, detail
        assert any(match[u][i] for u in allowed), detail
    assert exact >= 0.8 * n


def shut_down(collector: Any, scheme: WeightSyncTorchRLScheme) -> float:
    start = time.monotonic()
    collector.shutdown(timeout=10.0)
    scheme.shutdown()
    return time.monotonic() - start


def assert_no_process_left(collector: Any) -> None:
    for proc in collector.procs:
        proc.join(5.0)
        assert not proc.is_alive(), f"worker pid {proc.pid} still alive"
        with pytest.raises(ProcessLookupError):
            os.kill(proc.pid, 0)  # reaped, not a zombie
    assert not [t.name for t in threading.enumerate() if "weight-sync-torchrl" in t.name]


def reap(collector: Any, scheme: WeightSyncTorchRLScheme) -> None:
    """Fixture teardown: whatever a test left, no process survives the module."""
    try:
        collector.shutdown(timeout=10.0, raise_on_error=False)
    finally:
        scheme.shutdown()
        for proc in getattr(collector, "procs", []):
            if proc.is_alive():
                proc.kill()
            proc.join(5.0)


# -- in-process: pickling, the torchrl-named ends, versions, a re-pointed model --------------
def test_unknown_transport_is_refused_listing_the_registered_ones() -> None:
    with pytest.raises(ConfigError, match=r"registered: .*'distributed'.*'shm'"):
        WeightSyncTorchRLScheme(transport="carrier-pigeon")
    with pytest.raises(ConfigError, match="ack_timeout"):
        WeightSyncTorchRLScheme(ack_timeout=0)


@pytest.mark.timeout(60)
def test_pickled_scheme_carries_only_connection_info() -> None:
    learner = buffered_policy()
    scheme = WeightSyncTorchRLScheme(transport="shm")
    scheme.init_on_sender(model_id="policy", model=learner, num_workers=WORKERS)
    try:
        assert isinstance(scheme.create_transport(), LearnerEnd)
        blob = pickle.dumps(scheme)
        assert len(blob) < 20_000  # no weights, no sender, no threads
        copy_ = pickle.loads(blob)
        assert copy_.infos == scheme.infos and len(copy_.infos) == 1  # one sender
        assert all(isinstance(i, ConnectionInfo) for i in copy_.infos)
        assert copy_._learner is None and copy_._worker is None
        assert not copy_.initialized_on_sender and not copy_.synchronized_on_sender
        with pytest.raises(ProtocolError):
            scheme.send()  # before connect()
    finally:
        scheme.shutdown()
    with pytest.raises(ClosedError):
        scheme._require_learner("send")


@pytest.mark.timeout(90)
@pytest.mark.parametrize("transport", ["distributed", "shm", SOCKET])
def test_in_process_round_trip_through_a_torchrl_collector(transport: str) -> None:
    """Learner scheme, pickled copy as a worker's receiver scheme, a real torchrl
    ``Collector`` as its context: initial sync into a meta policy, versions equal to
    the collector's ``policy_version``, a model re-pointed after connect kept current,
    and the torchrl-named methods of both ends."""
    torch.manual_seed(0)
    learner = buffered_policy()
    scheme = WeightSyncTorchRLScheme(transport=transport, **SCHEME_TIMEOUTS)
    scheme.init_on_sender(model_id="policy", model=learner, num_workers=1)
    worker = pickle.loads(pickle.dumps(scheme))
    meta_policy = buffered_policy().to("meta")  # how torchrl ships a policy to a worker
    worker.init_on_receiver(model_id="policy", model=meta_policy, worker_idx=0)
    connected = threading.Thread(target=scheme.connect)
    connected.start()
    collector = None
    try:
        worker.connect(worker_idx=0)
        connected.join(30.0)
        assert scheme.synchronized_on_sender and worker.synchronized_on_receiver
        assert equal(state(meta_policy), state(learner))  # initial sync, real storage
        assert worker.versions == {0: 0} and scheme.versions == {0: 0}
        collector = Collector(make_cartpole(), policy=meta_policy, frames_per_batch=8,
                              total_frames=-1, track_policy_version=True)
        collector.register_scheme_receiver({"policy": worker})
        assert worker.context is collector and collector.policy_version == 0

        before = state(learner)
        perturb(learner)
        assert equal(state(meta_policy), before)  # not aliased: nothing sent yet
        scheme.send()
        assert equal(state(meta_policy), state(learner))
        _until(lambda: collector.policy_version == 1)
        assert worker.versions == {0: 1} == scheme.versions

        # torchrl re-points scheme.model after a device cast: the new model follows.
        moved = copy.deepcopy(meta_policy)
        worker.model = moved
        perturb(learner)
        scheme.send()
        _until(lambda: collector.policy_version == 2)
        assert equal(state(moved), state(learner))

        # The torchrl-named ends, directly.
        learner_end = scheme.create_transport()
        assert isinstance(learner_end, LearnerEnd)
        assert isinstance(worker.create_transport(), WorkerEnd)
        perturb(learner)
        ack = learner_end.send_weights(TensorDict.from_module(learner), timeout=30.0)
        assert ack.complete and ack.version == 3
        _until(lambda: collector.policy_version == 3)
        assert equal(state(moved), state(learner))
        assert worker.receive() is None  # the background thread applies, not receive()
        worker_end = worker.create_transport()
        worker_end.send_ack("updated")  # a no-op: acks go out as versions are applied
    finally:
        t = time.monotonic()
        worker.shutdown()  # workers first, as a collector's shutdown does
        scheme.shutdown()
        assert time.monotonic() - t < SHUTDOWN_BOUND_S
        if collector is not None:
            collector.shutdown()
    assert worker.error is None


def _until(condition: Any, timeout: float = 10.0) -> None:
    """The worker's background thread bumps the version right after acking: wait for
    it (bounded)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


@pytest.mark.timeout(120)
def test_worker_failing_to_start_is_reported_at_once_naming_it() -> None:
    scheme = WeightSyncTorchRLScheme(**SCHEME_TIMEOUTS)  # connect_timeout: 120 s
    before = set(mp.active_children())
    start = time.monotonic()
    with pytest.raises(CollectorFailed, match=r"torchrl worker 1 exited.*boom") as info:
        MultiSyncCollector([make_cartpole, broken_cartpole], policy=buffered_policy(),
                           frames_per_batch=32, total_frames=-1,
                           weight_sync_schemes={"policy": scheme})
    assert time.monotonic() - start < 60.0  # not the connect timeout
    assert info.value.collector_id == 1
    with pytest.raises(ClosedError):
        scheme.connect()  # the scheme was shut down with the failed start
    for proc in set(mp.active_children()) - before:  # torchrl's shutdown ended them
        proc.join(10.0)
        assert not proc.is_alive()


# -- MultiSyncCollector, one sender for both workers ("distributed") --------------------------
@pytest.fixture(scope="module")
def sync_run() -> Iterator[dict[str, Any]]:
    torch.manual_seed(0)
    learner = buffered_policy()
    scheme = WeightSyncTorchRLScheme(transport="distributed", **SCHEME_TIMEOUTS)
    collector = MultiSyncCollector([make_cartpole] * WORKERS, policy=learner,
                                   policy_factory=buffered_policy, frames_per_batch=32,
                                   total_frames=-1, track_policy_version=True,
                                   weight_sync_schemes={"policy": scheme})
    run: dict[str, Any] = dict(collector=collector, scheme=scheme, learner=learner,
                               initial=state(learner))
    try:
        run["initial_workers"] = worker_states(collector)
        run["iter"] = iter(collector)
        run["first_batch"] = next(run["iter"])
        yield run
    finally:
        reap(collector, scheme)


@pytest.mark.timeout(180)
def test_sync_initial_sync_first_batch_uses_learner_weights(sync_run: dict[str, Any]) -> None:
    for w, ws in enumerate(sync_run["initial_workers"]):
        assert equal(ws["policy_state_dict"], sync_run["initial"]), f"worker {w}"
        assert int(ws["policy_version"]) == 0
    batch = sync_run["first_batch"]
    assert batch.shape[0] == WORKERS  # row w: worker w
    assert (batch["next", "policy_version"] == 0).all()
    assert_acted_with(batch, sync_run["initial"])
    # Control: the worker's own (factory) initialisation would have acted otherwise.
    with pytest.raises(AssertionError):
        assert_acted_with(batch, state(buffered_policy()))


@pytest.mark.timeout(120)
def test_sync_update_bit_exact_and_never_aliased(sync_run: dict[str, Any]) -> None:
    collector, scheme, learner = sync_run["collector"], sync_run["scheme"], sync_run["learner"]
    old = state(learner)
    perturb(learner)
    for w, ws in enumerate(worker_states(collector)):  # the learner moved, workers did not
        assert equal(ws["policy_state_dict"], old), f"worker {w} sees unsent weights"
        assert not equal(ws["policy_state_dict"], state(learner))
    version = scheme.versions[0]
    collector.update_policy_weights_()
    assert scheme.versions == {w: version + 1 for w in range(WORKERS)}
    for w, ws in enumerate(worker_states(collector)):
        assert equal(ws["policy_state_dict"], state(learner)), f"worker {w}"
        assert int(ws["policy_version"]) == version + 1


@pytest.mark.timeout(120)
def test_sync_policy_version_bumps_on_every_update_per_worker(
        sync_run: dict[str, Any]) -> None:
    collector, scheme, learner = sync_run["collector"], sync_run["scheme"], sync_run["learner"]
    for _ in range(3):
        perturb(learner)
        collector.update_policy_weights_()
        expected = scheme.versions
        batch = next(sync_run["iter"])
        for w in range(WORKERS):
            assert (batch["next", "policy_version"][w] == expected[w]).all(), f"worker {w}"
        assert_acted_with(batch, state(learner))
    assert [int(ws["policy_version"]) for ws in worker_states(collector)] == [
        scheme.versions[w] for w in range(WORKERS)]


@pytest.mark.timeout(120)
def test_sync_worker_ids_one_worker_holds_w_the_other_keeps_its_weights(
        sync_run: dict[str, Any]) -> None:
    """The default scheme honours worker_ids: worker 1 holds w bit for bit, worker 0
    keeps its weights and its policy_version, the learner is untouched."""
    collector, scheme, learner = sync_run["collector"], sync_run["scheme"], sync_run["learner"]
    collector.update_policy_weights_()
    before = dict(scheme.versions)
    kept, mine = worker_states(collector)[0]["policy_state_dict"], state(learner)
    w = state(buffered_policy())
    collector.update_policy_weights_(w, worker_ids=1)
    assert equal(state(learner), mine)  # the learner's own weights untouched
    w0, w1 = worker_states(collector)
    assert equal(w1["policy_state_dict"], w) and not equal(w, kept)
    assert equal(w0["policy_state_dict"], kept)
    assert int(w0["policy_version"]) == before[0]
    assert int(w1["policy_version"]) == scheme.versions[1] == before[1] + 1
    assert scheme.versions[0] == before[0]
    collector.update_policy_weights_(worker_ids=[0, 1])  # all of them again
    assert all(equal(ws["policy_state_dict"], mine) for ws in worker_states(collector))
    assert scheme.versions == {0: before[1] + 2, 1: before[1] + 2}


@pytest.mark.timeout(120)
def test_sync_shutdown_is_bounded_and_leaves_no_process(sync_run: dict[str, Any]) -> None:
    collector, scheme = sync_run["collector"], sync_run["scheme"]
    elapsed = shut_down(collector, scheme)
    assert elapsed < SHUTDOWN_BOUND_S, f"shutdown took {elapsed:.2f}s"
    assert_no_process_left(collector)
    with pytest.raises(ClosedError):
        scheme.send()


# -- MultiSyncCollector over "shm": worker_ids, per-worker weights, a worker killed --------
@pytest.fixture(scope="module")
def per_worker_run() -> Iterator[dict[str, Any]]:
    torch.manual_seed(1)
    learner = buffered_policy()
    scheme = WeightSyncTorchRLScheme(transport="shm", **SCHEME_TIMEOUTS)
    collector = MultiSyncCollector([make_cartpole] * WORKERS, policy=learner,
                                   policy_factory=buffered_policy, frames_per_batch=32,
                                   total_frames=-1, track_policy_version=True,
                                   weight_sync_schemes={"policy": scheme})
    run: dict[str, Any] = dict(collector=collector, scheme=scheme, learner=learner)
    try:
        run["iter"] = iter(collector)
        next(run["iter"])
        yield run
    finally:
        reap(collector, scheme)


@pytest.mark.timeout(180)
def test_per_worker_worker_ids_update_only_those_workers(
        per_worker_run: dict[str, Any]) -> None:
    collector, scheme, learner = (per_worker_run[k] for k in ("collector", "scheme", "learner"))
    assert scheme.versions == {0: 0, 1: 0}
    old = state(learner)
    perturb(learner)
    collector.update_policy_weights_(worker_ids=[1])
    assert scheme.versions == {0: 0, 1: 1}
    w0, w1 = worker_states(collector)
    assert equal(w0["policy_state_dict"], old) and int(w0["policy_version"]) == 0
    assert equal(w1["policy_state_dict"], state(learner)) and int(w1["policy_version"]) == 1
    batch = next(per_worker_run["iter"])
    assert (batch["next", "policy_version"][0] == 0).all()
    assert (batch["next", "policy_version"][1] == 1).all()

    # torchrl's per-worker weights dict: each worker gets its own (a version each).
    other = buffered_policy()
    collector.update_policy_weights_({0: state(other), 1: TensorDict.from_module(learner)})
    assert scheme.versions == {0: 2, 1: 3}
    w0, w1 = worker_states(collector)
    assert equal(w0["policy_state_dict"], state(other))
    assert equal(w1["policy_state_dict"], state(learner))
    assert [int(w0["policy_version"]), int(w1["policy_version"])] == [2, 3]


@pytest.mark.timeout(120)
def test_per_worker_killed_worker_is_a_typed_error_naming_it(
        per_worker_run: dict[str, Any]) -> None:
    collector, scheme, learner = (per_worker_run[k] for k in ("collector", "scheme", "learner"))
    victim = collector.procs[1]
    os.kill(victim.pid, signal.SIGKILL)
    victim.join(10.0)
    perturb(learner)
    start = time.monotonic()
    with pytest.raises(CollectorFailed, match=r"collector\(s\) \[1\] failed") as info:
        collector.update_policy_weights_()
    assert time.monotonic() - start < ERROR_BOUND_S
    assert info.value.collector_id == 1 and info.value.pid == victim.pid
    # The live worker was still updated (torchrl's own state_dict() cannot be asked with
    # a dead worker: its pipe is broken), and is served on.
    assert scheme.last_ack is not None and scheme.last_ack.acked == (0,)
    collector.update_policy_weights_(worker_ids=[0])
    assert scheme.last_ack.complete and scheme.last_ack.version == scheme.versions[0]
    elapsed = shut_down(collector, scheme)
    assert elapsed < SHUTDOWN_BOUND_S, f"shutdown took {elapsed:.2f}s"
    assert_no_process_left(collector)


# -- MultiAsyncCollector, one sender ("shm"): updates while the workers collect ---------------
@pytest.mark.timeout(180)
def test_async_updates_while_collecting_and_a_worker_killed_mid_run() -> None:
    torch.manual_seed(2)
    learner = buffered_policy()
    scheme = WeightSyncTorchRLScheme(transport="shm", **SCHEME_TIMEOUTS)
    collector = MultiAsyncCollector([make_cartpole] * WORKERS, policy=learner,
                                    policy_factory=buffered_policy, frames_per_batch=32,
                                    total_frames=-1, track_policy_version=True,
                                    weight_sync_schemes={"policy": scheme})
    try:
        for w, ws in enumerate(worker_states(collector)):  # before collection starts
            assert equal(ws["policy_state_dict"], state(learner)), f"worker {w}"
        by_version = {0: state(learner)}
        seen: set[int] = set()
        batches = iter(collector)
        for _ in range(8):
            batch = next(batches)
            assert_frames_honest(batch, by_version)
            seen.update(batch["next", "policy_version"].unique().tolist())
            perturb(learner)
            collector.update_policy_weights_()  # the workers are mid-rollout: no deadlock
            by_version[scheme.versions[0]] = state(learner)
        assert len(seen) >= 3 and max(seen) >= 4  # versions moved while collecting

        victim = collector.procs[0]
        os.kill(victim.pid, signal.SIGKILL)
        victim.join(10.0)
        start = time.monotonic()
        with pytest.raises(CollectorFailed, match=r"collector\(s\) \[0\] failed") as info:
            collector.update_policy_weights_()
        assert time.monotonic() - start < ERROR_BOUND_S
        assert info.value.collector_id == 0 and info.value.pid == victim.pid
        collector.update_policy_weights_()  # the survivor is still served
        elapsed = shut_down(collector, scheme)
        assert elapsed < SHUTDOWN_BOUND_S, f"shutdown took {elapsed:.2f}s"
        assert_no_process_left(collector)
    finally:
        reap(collector, scheme)


# -- DistributedCollector (launcher="mp"): nodes are ranks 1..N ------------------------------
@pytest.mark.timeout(180)
def test_distributed_collector_initial_sync_updates_and_bounded_shutdown() -> None:
    torch.manual_seed(3)
    learner = buffered_policy()
    scheme = WeightSyncTorchRLScheme(transport="distributed", **SCHEME_TIMEOUTS)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    collector = DistributedCollector(
        [make_cartpole] * WORKERS, policy=learner, policy_factory=buffered_policy,
        frames_per_batch=32 * WORKERS, total_frames=10**6, collector_class=Collector,
        collector_kwargs={"track_policy_version": True}, launcher="mp", tcp_port=port,
        sync=True, backend="gloo", weight_sync_schemes={"policy": scheme})
    try:
        batches = iter(collector)
        batch = next(batches)  # row w: node w (rank w + 1)
        assert (batch["next", "policy_version"] == 0).all()
        assert_acted_with(batch, state(learner))  # the nodes' own init never acted
        for _ in range(2):
            perturb(learner)
            collector.update_policy_weights_()
            batch = next(batches)
            assert scheme.versions == {w: scheme.versions[0] for w in range(WORKERS)}
            for w in range(WORKERS):
                assert (batch["next", "policy_version"][w] == scheme.versions[w]).all()
            assert_acted_with(batch, state(learner))
        start = time.monotonic()
        collector.shutdown()  # tells the nodes, joins them, then shuts this scheme down
        elapsed = time.monotonic() - start
        assert elapsed < SHUTDOWN_BOUND_S, f"shutdown took {elapsed:.2f}s"
        for job in collector.jobs:
            job.join(5.0)
            assert not job.is_alive()
        with pytest.raises(ClosedError):
            scheme.send()
    finally:
        scheme.shutdown()
        for job in getattr(collector, "jobs", []):
            if job.is_alive():
                job.kill()
            job.join(5.0)


# -- the main job on torchrl's collectors ------------------------------------------------------
@pytest.mark.timeout(180)
def test_demo_with_torchrl_collector_writes_the_same_json(tmp_path: Path) -> None:
    out = tmp_path / "demo.json"
    code = demo_main(["--collector", "torchrl", "--iterations", "3", "--frames-per-batch",
                      "64", "--quiet", "--json-out", str(out)])
    assert code == 0
    data = json.loads(out.read_text())
    rows = data["iterations"]
    assert [r["iteration"] for r in rows] == [1, 2, 3]
    for row in rows:
        for key in ("avg_return", "sync_latency_s", "staleness_mean", "frames", "fps",
                    "version"):
            assert key in row
        assert row["frames"] == 2 * 64 and row["version"] == row["iteration"]
        assert row["staleness_max"] == 0  # updated between batches
    summary = data["summary"]
    assert summary["collector"] == "torchrl" and summary["iterations"] == 3
    assert summary["sync_rounds"] >= 3
