"""The host soak's short run (``benchmarks/soak_hosts.py``): collector kills, a link flap,
a rate drop and a learner restart on the test bed, every apply checked exactly.

Needs root and iproute2; skipped with :func:`testbed.available`'s reason otherwise.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import testbed  # noqa: E402

REASON = testbed.available()
pytestmark = [pytest.mark.slow, pytest.mark.timeout(420),
              pytest.mark.skipif(REASON is not None, reason=f"no test bed here: {REASON}")]


def test_short_soak_with_a_learner_restart(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.soak_hosts", "--rounds", "150", "--hosts", "2",
         "--kill-every", "30", "--restart-rounds", "10", "--flap-every", "60",
         "--throttle-every", "60", "--learner-restarts", "1", "--seed", "3",
         "--json-out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert out.exists(), run.stdout[-2000:] + run.stderr[-2000:]
    result = json.loads(out.read_text())
    assert run.returncode == 0, json.dumps(
        {k: result[k] for k in ("notes", "hang_notes", "final_error")})
    assert result["rounds"] == 150 and result["learner_restarts"] == 1
    assert result["mismatches"] == 0 and result["hangs"] == 0
    assert result["unexpected_exits"] == 0 and result["forced_restarts"] == 0
    # Every collector alive at the restart re-attached; all ended at the last version.
    assert result["reattached"] >= 1
    assert result["collectors_at_final_version"] == list(range(4))
    # One version per round, and a restarted learner resumes at or after the last
    # version reported (its checkpoint is written before each send).
    assert result["final_version"] >= 150
