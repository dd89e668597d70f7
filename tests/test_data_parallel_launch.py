"""A 2-rank data-parallel learner (``tests/dp_job.py``) with 4 collector processes,
started by real launchers: ``torch.distributed.run`` (one node of 2 ranks, and 2
"nodes" of 1 rank meeting at a c10d rendezvous endpoint, as on a cluster) and
torchrunx. After every step the weights are bit-equal on both ranks, the reduced
gradient is the mean of the ranks' gradients, and every collector acked the version
and holds exactly the learner's weights."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import dp_job
import pytest
from harness import free_port

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
JOB_TIMEOUT_S = 150


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(TESTS),
                                         *filter(None, [env.get("PYTHONPATH")])])
    env["OMP_NUM_THREADS"] = "1"
    return env


def _torchrun(nnodes: int, nproc: int, endpoint: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes),
            "--nproc-per-node", str(nproc), "--rdzv-backend", "c10d",
            "--rdzv-endpoint", endpoint, "--rdzv-id", "dp-test", "--max-restarts", "0"]


def _run_all(commands: list[list[str]], cwd: Path) -> list[tuple[int, str]]:
    """Run the commands together, each in its own session; reap every process."""
    procs = [subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
             for cmd in commands]
    outcomes = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=JOB_TIMEOUT_S)
            outcomes.append((proc.returncode, out))
    finally:
        for proc in procs:  # the launcher, its ranks and their collectors
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    return outcomes


def check_records(records: list[dict[str, Any]]) -> None:
    assert [r["rank"] for r in records] == [0, 1]
    assert [r["served"] for r in records] == [[0, 2], [1, 3]]  # collector i on rank i % 2
    for r in records:
        assert r["world_size"] == 2
        assert r["started_equal"] is False and r["equal_after_broadcast"] is True
        assert r["initial_sync"] is True
        assert [s["version"] for s in r["steps"]] == list(range(1, dp_job.STEPS + 1))
        for step in r["steps"]:
            assert step["grads_differed"] and step["grad_is_mean"], step
            assert step["weights_equal"], step
            assert step["acked"] == [0, 1], step  # both of this rank's collectors
            assert step["applied"] == [[gid, step["version"], True] for gid in r["served"]]
        assert r["bad_input"]["out_of_range"].startswith("ConfigError: collector must be in "
                                                         "[0, 4), got 4")
        assert r["bad_input"]["duplicate"] == "DuplicateCollectorError"
        assert r["collector_applies"] == [dp_job.STEPS + 1] * 2  # initial sync + each step


def test_torchrun_one_node_two_ranks(tmp_path: Path) -> None:
    endpoint = f"127.0.0.1:{free_port()}"
    [(code, out)] = _run_all([[*_torchrun(1, 2, endpoint), str(TESTS / "dp_job.py"),
                               str(tmp_path)]], tmp_path)
    assert code == 0, out
    check_records(json.loads((tmp_path / "result.json").read_text()))


@pytest.mark.slow
def test_torchrun_two_nodes_at_a_rendezvous_endpoint(tmp_path: Path) -> None:
    """Two torchrun agents (as on two hosts) of one rank each, ``--nnodes 2``."""
    endpoint = f"127.0.0.1:{free_port()}"
    command = [*_torchrun(2, 1, endpoint), str(TESTS / "dp_job.py"), str(tmp_path)]
    outcomes = _run_all([command, command], tmp_path)
    for code, out in outcomes:
        assert code == 0, out
    check_records(json.loads((tmp_path / "result.json").read_text()))


TORCHRUNX_MAIN = """
import json, sys, torchrunx, dp_job
launcher = torchrunx.Launcher(hostnames=["localhost"], workers_per_host=2, backend="gloo",
                              worker_timeout=60, agent_timeout=60)
result = launcher.run(dp_job.run_rank, None)
print("RESULT " + json.dumps(result.rank(0)), flush=True)
"""


@pytest.mark.slow
def test_torchrunx_localhost_two_workers(tmp_path: Path) -> None:
    """torchrunx starts its agent on "localhost" with a local shell (no ssh); the
    workers come with the process group up, which the helper adopts."""
    pytest.importorskip("torchrunx")
    [(code, out)] = _run_all([[sys.executable, "-c", TORCHRUNX_MAIN]], tmp_path)
    assert code == 0, out
    [line] = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
    check_records(json.loads(line.removeprefix("RESULT "))["records"])
