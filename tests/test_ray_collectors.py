"""Collectors as Ray actors (:class:`~weight_sync.collectors.ray_launcher.RayLauncher`) on a real
local Ray.

One Ray instance for the module (``ray.init`` with 4 logical CPUs, no dashboard), bound to
127.0.0.1 and stopped at the end; every process it started carries a marker in its
environment, and the module's teardown checks that none of them outlives
``ray.shutdown()``. The collectors run the CartPole task and connect their
``WeightReceiver`` to the test's ``WeightSender`` on 127.0.0.1, as local collector
processes do. Every wait is bounded (group and ``get_all`` timeouts, pidfd waits).
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from harness import free_port, process_gone

# conftest.py set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 before anything imported Ray: its
# processes then bind 127.0.0.1 only (checked by the fixture).
ray = pytest.importorskip(
    "ray", reason="ray is not importable: these tests need the 'ray' extra "
                  "(pip install -e '.[ray]')", exc_type=ImportError)

from weight_sync.collectors import (  # noqa: E402
    CHECKSUM_KEY,
    VERSION_KEY,
    WORKER_KEY,
    CollectorDied,
    CollectorGroup,
    CollectorTimeout,
    policy_checksum,
)
from weight_sync.collectors.errors import PlacementTimeout  # noqa: E402
from weight_sync.collectors.ray_launcher import RayLauncher, RayLauncherConfig  # noqa: E402
from weight_sync.collectors.task import collect, make_env, make_policy  # noqa: E402

pytestmark = pytest.mark.timeout(240)

FRAMES = 64
RESTART_S = 90.0  # a restarted collector back with new weights: a hang guard
TIMEOUTS = dict(connect_timeout=90.0, batch_timeout=60.0, shutdown_timeout=10.0)
_MARKER = "WEIGHT_SYNC_RAY_TEST"
_ROOT = Path(__file__).resolve().parents[1]


# -- helpers -----------------------------------------------------------------------------


def _marked(marker: bytes) -> dict[int, str]:
    """Live processes whose environment holds ``marker``, with their command lines."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if marker not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                out[int(entry)] = f.read().replace(b"\0", b" ").decode(errors="replace")[:120]
        except OSError:  # ended meanwhile, or a zombie
            continue
    return out


def _perturb(policy: torch.nn.Module, step: int) -> None:
    gen = torch.Generator().manual_seed(step)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))


def _group(policy: torch.nn.Module, launcher: RayLauncher, **kwargs: Any) -> CollectorGroup:
    opts: dict[str, Any] = dict(num_collectors=2, frames_per_batch=FRAMES, seed=0,
                                collect_fn=collect, launcher=launcher, **TIMEOUTS)
    opts.update(kwargs)
    return CollectorGroup(policy, make_env, make_policy, **opts)


@pytest.fixture(scope="module")
def ray_cluster() -> Any:
    """A local Ray for the module; after ``ray.shutdown()`` none of its processes remains.
    Yields the environment entry its processes carry (see :func:`_marked`)."""
    value = uuid.uuid4().hex
    marker = f"{_MARKER}={value}".encode()
    os.environ[_MARKER] = value  # inherited by every process Ray starts, only by those
    try:
        # "local": a new Ray even when `ray start` left one running on this machine
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    finally:
        del os.environ[_MARKER]
    try:
        node_ip = ray.util.get_node_ip_address()
        assert node_ip == "127.0.0.1", (
            f"Ray bound {node_ip}, not 127.0.0.1: RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 must be "
            "set before Ray is first imported (tests/conftest.py does)")
        started = _marked(marker)
        assert any("raylet" in cmd for cmd in started.values()), started
        yield marker
    finally:
        ray.shutdown()
        left = _wait_gone(marker, 30)
        assert not left, f"Ray processes left after ray.shutdown(): {left}"


# -- tests -------------------------------------------------------------------------------
def test_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="'ROUND_ROBIN'"):
        RayLauncherConfig(strategy="ROUND_ROBIN")
    with pytest.raises(ValueError, match="num_cpus must be > 0, got 0"):
        RayLauncherConfig(num_cpus=0)
    with pytest.raises(ValueError, match="placement_timeout must be > 0, got -1"):
        RayLauncherConfig(placement_timeout=-1)
    assert RayLauncherConfig(num_cpus=2, num_gpus=0.5).bundle == {"CPU": 2.0, "GPU": 0.5}


def test_actors_deliver_version_tagged_batches_with_the_learners_weights(
        ray_cluster: Any) -> None:
    torch.manual_seed(0)
    policy = make_policy()
    checksums = {0: policy_checksum(policy)}
    launcher = RayLauncher(RayLauncherConfig(strategy="PACK", placement_timeout=60))
    with _group(policy, launcher, record_checksum=True) as group:
        # group-level calls: one future per collector, in id order
        info = launcher.get_all(launcher.run_all("node_info"), timeout=30)
        assert [i["worker_id"] for i in info] == [0, 1]
        assert [i["pid"] for i in info] == group.pids and os.getpid() not in group.pids
        assert {i["node_ip"] for i in info} == {"127.0.0.1"}
        assert set(group.pids) <= set(_marked(ray_cluster))  # seen by the teardown check
        threads = launcher.run_each("apply", [(torch.get_num_threads,)] * 2)
        assert launcher.get_all(threads, timeout=30) == [1, 1]  # ran inside the collectors
        with pytest.raises(CollectorTimeout, match=r"\[0, 1\] not done within 0.2s"):
            launcher.get_all(launcher.run_all("apply", time.sleep, 5), timeout=0.2)
        table = ray.util.placement_group_table(launcher.placement_group)
        assert table["strategy"] == "PACK" and table["state"] == "CREATED"
        assert len(table["bundles"]) == 2
        pg = launcher.placement_group

        newest: dict[int, int] = {0: -1, 1: -1}
        for step, batch in enumerate(group):
            record = group.batch_records[-1]
            assert batch.batch_size == torch.Size([FRAMES])
            assert bool((batch[WORKER_KEY] == record.worker_id).all())
            versions = batch[VERSION_KEY].tolist()
            assert (min(versions), max(versions)) == (record.version_min, record.version_max)
            # every step acted with the weights of the version it carries: the learner's
            # weights reached the actors over weight-sync
            for version, checksum in zip(versions, batch[CHECKSUM_KEY].tolist(), strict=True):
                assert checksum == checksums[version]
            newest[record.worker_id] = max(newest[record.worker_id], record.version_max)
            if min(newest.values()) >= 3:
                break
            assert step < 60, f"collectors should act with version 3 within a few batches: {newest}"
            _perturb(policy, step)
            group.update_weights(timeout=30)
            checksums[group.version] = policy_checksum(policy)
        pids = group.pids
    assert all(process_gone(pid, timeout=30) for pid in pids), "actors outlived the group"
    assert ray.util.placement_group_table(pg)["state"] == "REMOVED"
    assert launcher.workers == {} and ray.is_initialized()  # not the launcher's Ray to stop


def test_killed_actor_is_restarted_then_a_second_death_is_raised(ray_cluster: Any) -> None:
    torch.manual_seed(0)
    policy = make_policy()
    launcher = RayLauncher(RayLauncherConfig(placement_timeout=60))
    with _group(policy, launcher, max_restarts=1) as group:
        next(group)
        old_pid = group.workers[0].pid
        ray.kill(group.workers[0].actor)  # type: ignore[attr-defined]
        # A hang guard, not a count of the other collector's batches: the new actor
        # imports torch and torchrl first (seconds), while the other's batches keep the
        # loop turning every few ms.
        deadline = time.monotonic() + RESTART_S
        for step, _ in enumerate(group):
            record = group.batch_records[-1]
            if group.restarts and record.worker_id == 0 \
                    and record.version_min > group.restarts[0].learner_version:
                break  # the new actor caught up and got updates since
            _perturb(policy, step)
            group.update_weights(timeout=30)  # never raises: the failure was restarted
            assert time.monotonic() < deadline, \
                f"the restarted collector delivered nothing new within {RESTART_S}s"
        [restart] = group.restarts
        assert restart.worker_id == 0 and "killed by `ray.kill`" in restart.reason
        assert group.workers[0].pid not in (None, old_pid) and process_gone(old_pid, timeout=30)

        ray.kill(group.workers[0].actor)  # type: ignore[attr-defined]
        deadline = time.monotonic() + RESTART_S
        with pytest.raises(CollectorDied) as info:
            while time.monotonic() < deadline:  # the death is raised at the next batch
                next(group)
                group.update_weights(timeout=30)
        assert info.value.worker_id == 0 and "actor died" in str(info.value)
        with pytest.raises(CollectorDied, match="collector 0 died before answering"):
            launcher.get_all(launcher.run_all("pid"), timeout=30)
        pids = group.pids
    assert all(process_gone(pid, timeout=30) for pid in pids)


def test_collectors_that_cannot_be_placed_raise_placement_timeout(ray_cluster: Any) -> None:
    launcher = RayLauncher(RayLauncherConfig(num_cpus=64, placement_timeout=2))
    group = _group(make_policy(), launcher)
    with pytest.raises(PlacementTimeout, match=r"2 bundle\(s\) \{'CPU': 64.0\} \(SPREAD\) not "
                                               r"placed within 2.0s: the cluster has 4 CPU"):
        group.start()
    assert launcher.placement_group is None and launcher.workers == {}
    assert all(pg["state"] == "REMOVED" for pg in ray.util.placement_group_table().values())


def _demo(args: list[str], tmp_path: Path, env: dict[str, str] | None = None,
          timeout: float = 300) -> tuple[dict[str, Any], str]:
    """Run ``weight-sync demo --launcher ray ARGS`` in its own process; its JSON and stdout."""
    out = tmp_path / "demo.json"
    environ = {**os.environ, **(env or {}),
               "PYTHONPATH": os.pathsep.join([str(_ROOT), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run(
        [sys.executable, "-m", "weight_sync.cli", "demo", "--launcher", "ray", "--quiet",
         "--json-out", str(out), *args],
        cwd=_ROOT, env=environ, capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, f"demo failed ({run.returncode}):\n{run.stdout}\n{run.stderr}"
    return json.loads(out.read_text()), " ".join(run.stdout.split())  # rich wraps lines


@pytest.mark.slow
def test_demo_with_its_own_local_ray_learns_and_leaves_no_ray_process(
        ray_cluster: Any, tmp_path: Path) -> None:
    value = uuid.uuid4().hex
    data, stdout = _demo(["--iterations", "30", "--seed", "0"], tmp_path,
                         env={_MARKER: value})
    summary = data["summary"]
    assert summary["launcher"] == "ray" and summary["iterations"] == 30
    assert summary["final_version"] == 30 and summary["total_frames"] == 30 * 2 * 256
    assert summary["last_avg_return"] > 2 * summary["first_avg_return"], summary  # learning
    assert "2 collector(s) as Ray actors" in stdout and "average return" in stdout
    # the demo's Ray (a second one beside the module's) ended with it
    left = _wait_gone(f"{_MARKER}={value}".encode(), 30)
    assert not left, f"the demo left Ray processes behind: {left}"


def _wait_gone(marker: bytes, timeout: float) -> dict[int, str]:
    """The processes carrying ``marker`` still alive after up to ``timeout`` s."""
    deadline = time.monotonic() + timeout
    return {pid: cmd for pid, cmd in _marked(marker).items()
            if not process_gone(pid, max(deadline - time.monotonic(), 0))}


@contextlib.contextmanager
def _ray_start_head(port: int, auth: dict[str, str], marker: str,
                    timeout: float = 120) -> Iterator[None]:
    """``ray start --head --port PORT --block`` (the README's head node) until the block
    exits; then it is terminated and every process it started is checked gone. ``auth``:
    Ray's token settings, which the drivers joining it need too."""
    temp_dir = tempfile.mkdtemp(prefix="wsray-")  # short: Ray's unix sockets live in it
    env = {**os.environ, **auth, "RAY_TMPDIR": temp_dir, _MARKER: marker,
           "PYTHONUNBUFFERED": "1"}  # its "started" line must not wait in a pipe buffer
    head = subprocess.Popen(
        [str(Path(sys.executable).with_name("ray")), "start", "--head", f"--port={port}",
         "--num-cpus=4", "--include-dashboard=false", "--block"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert head.stdout is not None
        # Raw reads of the pipe: a buffered readline() may pull several lines into
        # Python's buffer, after which select() waits on an empty pipe for ever.
        fd, deadline, seen = head.stdout.fileno(), time.monotonic() + timeout, b""
        while b"Ray runtime started" not in seen:  # printed once the head serves
            remaining = deadline - time.monotonic()
            readable, _, _ = select.select([fd], [], [], max(remaining, 0))
            chunk = os.read(fd, 65536) if readable else b""
            assert chunk, f"ray start --head not up within {timeout}s: {seen.decode()[-2000:]}"
            seen += chunk
        yield
    finally:
        head.terminate()
        try:
            head.wait(30)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait(10)
        left = _wait_gone(f"{_MARKER}={marker}".encode(), 30)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not left, f"ray start left processes behind: {left}"


@pytest.mark.slow
def test_demo_joins_a_ray_started_with_ray_start(tmp_path: Path) -> None:
    port = free_port()
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": uuid.uuid4().hex + uuid.uuid4().hex}
    with _ray_start_head(port, auth, uuid.uuid4().hex):
        data, stdout = _demo(["--iterations", "3", "--frames-per-batch", "64",
                              "--ray-address", f"127.0.0.1:{port}"], tmp_path, env=auth)
        assert [r["version"] for r in data["iterations"]] == [1, 2, 3]
        assert data["config"]["ray_address"] == f"127.0.0.1:{port}"
        assert "2 collector(s) as Ray actors" in stdout
