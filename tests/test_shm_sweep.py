"""Shared-memory files of a process killed with its process group (its resource tracker
with it): the segments it made (relay slots, snapshots) are removed by the next
weight-sync process of the host that makes or closes one, like the learner's token. Seen
in the fault matrix: a relay head SIGKILLed left its 3 slots in ``/dev/shm``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from weight_sync.wire import shm

pytestmark = pytest.mark.timeout(60)

MAKER = """
import sys, time
from weight_sync.wire.shm import create_segment
segment, _ = create_segment(4096)
print(segment.name, flush=True)
time.sleep(60)
"""


def test_a_killed_process_group_s_segments_are_swept_a_live_one_s_are_kept() -> None:
    proc = subprocess.Popen([sys.executable, "-c", MAKER], stdout=subprocess.PIPE,
                            text=True, start_new_session=True)
    mine, _ = shm.create_segment(4096)
    try:
        assert proc.stdout is not None
        name = proc.stdout.readline().strip()
        assert name.startswith("ws-seg-"), name
        os.killpg(proc.pid, signal.SIGKILL)  # the tracker goes with it
        proc.wait(10)
        path = os.path.join(shm.SHM_DIR, name)
        assert os.path.exists(path), "the group's kill should leave the segment behind"
        assert shm.sweep_dead_owners() >= 1
        assert not os.path.exists(path)
        assert os.path.exists(os.path.join(shm.SHM_DIR, mine.name))  # alive: kept
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        mine.close()
        mine.unlink()
