"""Remote collectors on simulated hosts (``testbed/``): the demo learns CartPole with its
collectors on other hosts, batches over the network; a collector host cut off is
reported by the group, naming the collector, the run goes on with the others, and a new
process started with the cut-off id once the link is back takes its place.

Needs root and iproute2; skipped with :func:`testbed.available`'s reason otherwise.
Every process runs on a bed host and is killed and reaped by the bed at the end.
"""

from __future__ import annotations

import json
import os
import secrets
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # checkout packages, like testbed/ and benchmarks/
    sys.path.insert(0, str(ROOT))

from weight_sync.collectors.remote import ADDRESS_ENV, KEY_ENV  # noqa: E402

import testbed  # noqa: E402
from benchmarks.demo_hosts import PORT, run_on_bed  # noqa: E402
from testbed import TestBed  # noqa: E402

REASON = testbed.available()
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(REASON is not None, reason=f"no test bed here: {REASON}")]
ITERATIONS = 30
WAIT_S = 120.0  # hang guard on a loaded 2-core machine, not a speed claim


@pytest.mark.timeout(400)
def test_demo_learns_with_its_collectors_on_other_hosts() -> None:
    result = run_on_bed(2, 2, ["--iterations", str(ITERATIONS), "--seed", "0"], timeout=340)
    assert result["returncode"] == 0, result["stderr"]
    summary, rows = result["demo"]["summary"], result["demo"]["iterations"]
    assert summary["launcher"] == "network"
    assert summary["collector_hosts"] == ["host1", "host2"]  # not the learner's host0
    assert result["collector_exit_codes"] == [0, 0]
    assert summary["final_version"] == ITERATIONS == summary["iterations"]
    assert summary["total_frames"] == ITERATIONS * 2 * 256
    for row in rows:  # every step tagged with a version the learner had published
        assert 0 <= row["batch_version_min"] <= row["batch_version_max"] < row["version"]
    assert rows[-1]["batch_version_min"] > 0  # the collectors did get new weights
    assert summary["last_avg_return"] > 2 * summary["first_avg_return"], summary  # learning
    printed = " ".join(result["stdout"].split())  # rich wraps lines
    assert "2 collector(s) over the network" in printed and "average return" in printed
    assert "collector hosts │ host1, host2" in printed


# The learner of the cut test, on host 0: three remote collectors; after a cut it must
# report the cut-off one, keep going with the other two, and take the cut-off id back
# when a new process connects with it.
CUT_LEARNER = r'''
import json, sys, time
sys.path.insert(0, sys.argv[1])
import torch
torch.set_num_threads(1)
from weight_sync.collectors import CollectorGroup, VERSION_KEY, WORKER_KEY
from weight_sync.collectors.remote import NetworkLauncher
from weight_sync.collectors.task import collect, make_env, make_policy
from weight_sync import SenderConfig

address, port, n = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
def say(**fields):
    print(json.dumps(fields), flush=True)

torch.manual_seed(0)
launcher = NetworkLauncher(n, address, port, handshake_timeout=30)
group = CollectorGroup(make_policy(), make_env, make_policy, collect, num_collectors=n,
                       frames_per_batch=64, launcher=launcher, connect_timeout=120,
                       batch_timeout=60, shutdown_timeout=3, max_restarts=1,
                       sender_config=SenderConfig(host=address, liveness_timeout=3))
bad_tags, seen, after, acked_after, failed, ready = 0, {}, {}, set(), None, False
went_on, rejoined = None, 0
deadline = time.monotonic() + 150
with group:
    for batch in group:
        record, version = group.batch_records[-1], group.version
        versions = batch[VERSION_KEY]
        bad_tags += int(not (0 <= int(versions.min()) <= int(versions.max()) <= version)
                        or set(batch[WORKER_KEY].tolist()) != {record.worker_id})
        seen[record.worker_id] = seen.get(record.worker_id, 0) + 1
        if not ready and len(seen) == n and min(seen.values()) >= 2:
            ready = True
            say(ready=launcher.hosts, version=version)
        if failed is None and group.restarts:
            failed = group.restarts[0]
            say(failed=failed.worker_id, reason=failed.reason, at=failed.at,
                version=failed.learner_version)
        if failed is not None and record.version_min > failed.learner_version:
            if went_on is None:
                after[record.worker_id] = after.get(record.worker_id, 0) + 1
            elif record.worker_id == failed.worker_id:
                rejoined += 1
        result = group.update_weights(timeout=30)
        if failed is not None and went_on is None and not result.failed:
            acked_after.update(result.acked)
        if went_on is None and failed is not None and len(after) == n - 1 \
                and min(after.values()) >= 3:
            went_on = group.version
            say(after=after, acked_after=sorted(acked_after), version=went_on)
        if rejoined >= 2 and failed.worker_id in result.acked:
            break
        if time.monotonic() > deadline:
            say(error="timed out", seen=str(seen), after=after)
            sys.exit(1)
    say(rejoined=rejoined, bad_tags=bad_tags, restarts=len(group.restarts),
        hosts=launcher.hosts, version=group.version)
'''


def line(proc: subprocess.Popen[Any], timeout: float) -> dict[str, Any]:
    """The next JSON line of ``proc`` (raw reads under select: nothing buffered is lost)."""
    assert proc.stdout is not None
    fd, data, deadline = proc.stdout.fileno(), b"", time.monotonic() + timeout
    while not data.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        assert remaining > 0 and select.select([fd], [], [], remaining)[0], \
            f"no line from the learner within {timeout}s"
        byte = os.read(fd, 1)
        assert byte, f"the learner exited (rc {proc.wait(WAIT_S)}) before a line"
        data += byte
    return dict(json.loads(data))


@pytest.mark.timeout(400)
def test_a_collector_host_cut_off_is_reported_the_others_go_on_and_it_rejoins(
        tmp_path: Path) -> None:
    script = tmp_path / "learner.py"
    script.write_text(CUT_LEARNER)
    env = {**os.environ, KEY_ENV: secrets.token_hex(16)}
    with TestBed(hosts=4, rate="1gbit") as bed:
        home = bed.hosts[0]
        learner = home.popen([sys.executable, str(script), str(ROOT), home.address, str(PORT),
                              "3"], env=env, stdout=subprocess.PIPE, cwd=str(ROOT))
        collectors = [bed.hosts[1 + cid].popen(
            [sys.executable, "-m", "weight_sync.collectors.remote",
             "--id", str(cid), "--timeout", "120"],
            env={**env, ADDRESS_ENV: f"{home.address}:{PORT}"}, cwd=str(ROOT),
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for cid in range(3)]
        ready = line(learner, 240)
        assert ready["ready"] == {"0": "host1", "1": "host2", "2": "host3"}
        bed.cut(2)  # collector 1's host: its traffic stops both ways, nothing closes
        cut = time.time()
        failed = line(learner, WAIT_S)
        assert failed["failed"] == 1 and "collector 1" in failed["reason"], failed
        assert failed["version"] >= ready["version"]
        went_on = line(learner, WAIT_S)
        cut_off = collectors[1].wait(WAIT_S)  # it gives up on the silent learner by itself
        cut_off_err = collectors[1].stderr.read() if collectors[1].stderr else ""
        bed.restore(2)  # and a new process takes collector 1's place
        again = bed.hosts[2].popen(
            [sys.executable, "-m", "weight_sync.collectors.remote",
             "--id", "1", "--timeout", "120"],
            env={**env, ADDRESS_ENV: f"{home.address}:{PORT}"}, cwd=str(ROOT),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        final = line(learner, WAIT_S)
        assert learner.wait(WAIT_S) == 0
        codes = [collectors[0].wait(WAIT_S), again.wait(WAIT_S), collectors[2].wait(WAIT_S)]
    assert codes == [0, 0, 0]
    # meanwhile the batches and acks came from the two others only
    assert set(went_on["after"]) == {"0", "2"} and went_on["acked_after"] == [0, 2], went_on
    assert cut_off == 1 and "PeerGone" in cut_off_err, cut_off_err[-2000:]
    # the new process got newer weights and acked them; every batch was tagged right
    assert final["rejoined"] >= 2 and final["hosts"] == ready["ready"], final
    assert final["bad_tags"] == 0 and final["restarts"] == 1
    print(f"cut host reported {failed['at'] - cut:.1f}s after the cut "
          f"(liveness_timeout 3 s + shutdown_timeout 3 s)")
