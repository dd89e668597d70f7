"""The fault matrix's quick version (``python -m benchmarks.faults --quick``): two
transports x the six scenarios marked quick, on the test bed, every apply checked by
content. Fails on any wrong byte, any wait past its bound, any crash or leftover
(process, ``/dev/shm`` segment, store key), naming the cell and what happened.

The quick run needs root and iproute2 (skipped with :func:`testbed.available`'s reason
otherwise); the matrix's own bookkeeping (stale keys, the table) is checked without.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # checkout packages, like testbed/ and benchmarks/
    sys.path.insert(0, str(ROOT))

import testbed  # noqa: E402
from benchmarks.faults import (  # noqa: E402
    QUICK_TRANSPORTS,
    SCENARIOS,
    _stale_keys,
    markdown,
)

REASON = testbed.available()
#: The quick matrix takes ~3-4 min on 2 quiet cores; this bounds a hang, not speed.
BOUND_S = 560


def test_stale_keys_are_those_no_live_collector_accounts_for() -> None:
    held = ["join/0", "alive/0/1", "update/0/1/6", "ack/0/1/5",  # a dead incarnation
            "alive/0/2", "bye/0/2", "update/0/2/9", "update/0/2/10", "ack/0/2/9",
            "join/1", "alive/1/1", "hello/1/1",  # a hello nobody deleted
            "update/1/1/3", "update/1/1/4", "update/1/1/5"]  # one signal too many
    assert _stale_keys(held) == ["alive/0/1", "update/0/1/6", "ack/0/1/5", "hello/1/1",
                                 "3 update keys of 1/1"]
    assert _stale_keys(["join/0", "alive/0/1", "update/0/1/3", "ack/0/1/2"]) == []


def test_the_table_points_every_failure_to_its_reason() -> None:
    cell = {"detect_s": 2.0, "recover_s": 4.25, "note": "n"}
    result = {"command": "python -m benchmarks.faults", "date": "d", "wall_s": 60,
              "machine": "2 cores",
              "config": {"transports": ["distributed", "shm"], "rate": "1gbit",
                         "numel": 1_000_000, "step_ms": 100.0, "liveness": 2.0,
                         "learner_timeout": 3.0},
              "cells": [{"scenario": "kill_mid", "transport": "distributed",
                         "status": "ok", **cell},
                        {"scenario": "kill_mid", "transport": "shm", "status": "fail",
                         "reason": "wrong bytes applied: ['c0: version 3']"},
                        {"scenario": "link_cut", "transport": "shm", "status": "n/a",
                         "reason": "remote only"}]}
    text = markdown(result)
    assert "| collector SIGKILL mid-transfer | ✓ 2.0 s / 4.2 s | ✗ [1] |" in text
    assert "1. ✗ (kill_mid x shm): wrong bytes applied: ['c0: version 3']" in text
    assert "2. n/a (link_cut x shm): remote only" in text
    assert "1 of 2 cells that ran are ✓" in text


@pytest.mark.slow
@pytest.mark.timeout(BOUND_S + 40)
@pytest.mark.skipif(REASON is not None, reason=f"no test bed here: {REASON}")
def test_quick_fault_matrix(tmp_path: Path) -> None:
    out, md = tmp_path / "faults.json", tmp_path / "faults.md"
    run = subprocess.run([sys.executable, "-m", "benchmarks.faults", "--quick",
                          "--json-out", str(out), "--md-out", str(md)],
                         cwd=ROOT, capture_output=True, text=True, timeout=BOUND_S)
    assert out.exists(), run.stdout[-3000:] + run.stderr[-3000:]
    cells = json.loads(out.read_text())["cells"]
    quick = [s.name for s in SCENARIOS if s.quick]
    assert len(quick) == 6
    assert {(c["scenario"], c["transport"]) for c in cells} == {
        (s, t) for s in quick for t in QUICK_TRANSPORTS}
    ran = [c for c in cells if c["status"] != "n/a"]
    assert ran, cells
    # Content checks first: a wrong byte is the worst outcome, whatever else happened.
    assert sum(c.get("wrong", 0) for c in ran) == 0, [c for c in ran if c.get("wrong")]
    failed = {f"{c['scenario']} x {c['transport']}": c["reason"] for c in ran
              if c["status"] != "ok"}
    assert not failed, json.dumps(failed, indent=1)  # a leftover, a crash, a hang: named
    assert all(c["missed"] == 0 and not c["crashed"] and not c["leftovers"]
               and not c["stale_keys"] for c in ran), ran
    # Detection within its bound: liveness (2 s) + an ack slice, with slack for load.
    for c in ran:
        if c["scenario"] in ("kill_mid", "collector_stop", "link_cut"):
            assert c["detect_s"] is not None and c["detect_s"] < 10, c
    table = md.read_text()
    assert "| scenario |" in table and "✓" in table
    assert run.returncode == 0, run.stderr[-3000:]
