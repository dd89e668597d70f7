"""``weight-sync demo --learners 2``: the demo spawns torchrun itself; 2 data-parallel
learner ranks share 2 collectors and still learn CartPole."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ITERATIONS = 40


@pytest.mark.slow
def test_demo_with_two_learner_ranks_learns(tmp_path: Path) -> None:
    out = tmp_path / "demo.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    proc = subprocess.Popen(
        [sys.executable, "-m", "weight_sync.cli", "demo", "--learners", "2",
         "--iterations", str(ITERATIONS), "--quiet", "--json-out", str(out)],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=170)
    finally:  # torchrun, both ranks and their collectors
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    assert proc.returncode == 0, stderr[-4000:]
    # the single learner's summary, printed once (rank 0 only)
    assert stdout.count("average return, first -> last iteration") == 1, stdout
    # (the table's title wraps at the table's width)
    assert "data-parallel learner ranks" in " ".join(stdout.split())
    assert "frames, frames/s" in stdout
    data = json.loads(out.read_text())
    summary = data["summary"]
    assert summary["learners"] == 2 and summary["ranks_in_sync"] is True
    assert summary["iterations"] == ITERATIONS == summary["final_version"]
    assert summary["total_frames"] == ITERATIONS * 2 * 256  # both ranks' collectors
    assert all(row["frames"] == 2 * 256 for row in data["iterations"])
    # learning: the average return climbs well above a random policy's (~20)
    assert summary["last_avg_return"] > summary["first_avg_return"] + 30, summary
