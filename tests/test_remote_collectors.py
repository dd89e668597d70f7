"""Collectors started by someone else (``python -m weight_sync.collectors.remote``, as torchrun,
SLURM or a shell on another host would start them), their batches back over the
network to the learner's ``CollectorGroup`` through a :class:`NetworkLauncher`. Real
processes on 127.0.0.1, every one reaped."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from weight_sync.collectors import CollectorDied, CollectorGroup, CollectorRefused, CollectorTimeout
from weight_sync.collectors.demo import main as demo_main
from weight_sync.collectors.remote import NetworkLauncher, connect
from weight_sync.collectors.task import collect, make_env, make_policy
from weight_sync.collectors.worker import VERSION_KEY, WORKER_KEY, WorkerSpec

from weight_sync import ConnectionInfo

ROOT = Path(__file__).resolve().parents[1]
FRAMES = 64
WAIT_S = 60.0  # hang guard on a loaded 2-core machine


def remote(address: tuple[str, int], cid: int, *extra: str) -> subprocess.Popen[str]:
    env = {**os.environ, "WEIGHT_SYNC_COLLECTORS": f"{address[0]}:{address[1]}",
           "RANK": str(cid)}
    return subprocess.Popen([sys.executable, "-m", "weight_sync.collectors.remote",
                             *extra], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def reap(procs: list[subprocess.Popen[str]]) -> list[int]:
    codes = []
    for proc in procs:
        try:
            proc.wait(WAIT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(WAIT_S)
        codes.append(proc.returncode)
    return codes


def group_with(launcher: NetworkLauncher, **kwargs: Any) -> CollectorGroup:
    torch.manual_seed(0)
    return CollectorGroup(make_policy(), make_env, make_policy, collect, num_collectors=2,
                          frames_per_batch=FRAMES, launcher=launcher, connect_timeout=WAIT_S,
                          batch_timeout=WAIT_S, **kwargs)


def test_remote_collectors_send_version_tagged_batches_over_the_network() -> None:
    launcher = NetworkLauncher(num_collectors=2)
    group = group_with(launcher)
    procs = [remote(launcher.address, cid) for cid in range(2)]
    try:
        with group:
            seen: set[int] = set()
            for step, batch in enumerate(group):
                assert batch.batch_size == torch.Size([FRAMES])
                assert set(batch[VERSION_KEY].tolist()) <= set(range(group.version + 1))
                seen.update(batch[WORKER_KEY].unique().tolist())
                assert group.update_weights(timeout=30).complete
                if step >= 3 and seen == {0, 1}:
                    break
                assert step < 30, "both remote collectors should deliver"
            assert {w.host for w in group.workers} != {""}  # type: ignore[attr-defined]
    finally:
        codes = reap(procs)
    assert codes == [0, 0], [p.stderr.read() if p.stderr else "" for p in procs]


def test_a_remote_collector_that_dies_is_reported_by_id() -> None:
    launcher = NetworkLauncher(num_collectors=2)
    group = group_with(launcher)
    procs = [remote(launcher.address, cid) for cid in range(2)]
    try:
        with group:
            next(group)
            os.kill(procs[0].pid, signal.SIGKILL)
            procs[0].wait(WAIT_S)
            with pytest.raises(CollectorDied) as info:
                for _ in range(50):
                    next(group)
            assert info.value.worker_id == 0
    finally:
        reap(procs)


def test_bad_ids_and_an_absent_learner_are_refused_bounded() -> None:
    launcher = NetworkLauncher(num_collectors=1, handshake_timeout=5.0)
    try:
        # outside [0, 1): refused at once, exit 2 with the reason
        out_of_range = remote(launcher.address, 5)
        assert reap([out_of_range]) == [2]
        assert "outside [0, 1)" in (out_of_range.stderr.read() if out_of_range.stderr else "")
        # never launched within the handshake bound: refused
        unlaunched = remote(launcher.address, 0)
        assert reap([unlaunched]) == [2]
        assert "not launched" in (unlaunched.stderr.read() if unlaunched.stderr else "")
    finally:
        launcher.shutdown(5.0)
    # nothing listens any more: the entry point gives up within its timeout
    gone = remote(launcher.address, 0, "--timeout", "2")
    assert reap([gone]) == [2]
    assert "no learner answered" in (gone.stderr.read() if gone.stderr else "")


# -- refusals seen by the connecting side: typed, bounded (real sockets, no worker) ----------
def spec_for(cid: int) -> WorkerSpec:
    info = ConnectionInfo(host="127.0.0.1", port=1, name="unused", num_collectors=1)
    return WorkerSpec(worker_id=cid, info=info, env_factory=make_env,
                      policy_factory=make_policy, collect_fn=collect)


def test_a_second_connection_for_a_served_id_is_refused_and_the_first_kept() -> None:
    launcher = NetworkLauncher(num_collectors=1, handshake_timeout=5.0)
    try:
        handle = launcher.launch(spec_for(0), max_inflight=2)
        conn, spec, inflight = connect(launcher.address, 0, timeout=10)
        assert (spec.worker_id, inflight) == (0, 2)
        with pytest.raises(CollectorRefused, match="collector 0 is already connected") as info:
            connect(launcher.address, 0, timeout=10)
        assert info.value.worker_id == 0 and handle.connected
        handle.release_credit()  # the first connection still carries the learner's word
        assert conn.poll(10) and conn.recv_bytes() == b"c"
        with pytest.raises(CollectorRefused, match=r"collector 3: .*outside \[0, 1\)"):
            connect(launcher.address, 3, timeout=10)
        with pytest.raises(CollectorRefused, match="refused collector 0's key"):
            connect(launcher.address, 0, authkey=b"not the key", timeout=10)
        conn.close()
    finally:
        launcher.shutdown(5.0)


def test_an_address_that_accepts_but_never_answers_times_out_bounded() -> None:
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts (backlog), says nothing
        address = silent.getsockname()[:2]
        start = time.monotonic()
        with pytest.raises(CollectorTimeout, match=r"did not finish the handshake within 1\.0s"):
            connect(address, 0, timeout=1.0)
        assert time.monotonic() - start < WAIT_S  # a hang guard, not a timing
    # and once nothing listens there at all
    with pytest.raises(CollectorTimeout, match="no learner answered") as info:
        connect(address, 0, timeout=0.5)
    assert info.value.worker_id == 0


# -- the demo with collectors over the network -----------------------------------------------
def test_demo_launcher_network_starts_its_collectors_and_tags_versions(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))  # the children's import
    out = tmp_path / "demo.json"
    code = demo_main(["--launcher", "network", "--start-collectors", "--iterations", "3",
                      "--frames-per-batch", "64", "--quiet", "--json-out", str(out)])
    assert code == 0
    data = json.loads(out.read_text())
    summary, rows = data["summary"], data["iterations"]
    assert summary["launcher"] == "network" and summary["final_version"] == 3
    assert summary["collector_hosts"] == [socket.gethostname()] * 2
    assert summary["collector_exit_codes"] == [0, 0]  # stopped cleanly, reaped
    for row in rows:  # every step tagged with a version the learner had published
        assert 0 <= row["batch_version_min"] <= row["batch_version_max"] < row["version"]
        assert row["frames"] == 2 * 64
    assert "collector(s) over the network" in " ".join(capsys.readouterr().out.split())
