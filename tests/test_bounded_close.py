"""A learner that closes while a version is still on its way to a collector that
applies slowly (issue 24, P10): the collector applies that version, then gets
``ClosedError``, not ``PeerGone`` from a store that vanished meanwhile, and with
``reattach_timeout`` it does not wait for a learner that is not coming back."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from weight_sync import WeightReceiver, WeightSender
from weight_sync.errors import ClosedError, WeightSyncError

pytestmark = pytest.mark.timeout(120)

NUMEL = 10_000_000  # 40 MB
STEP_S = 3.0  # the collector's time between polls: longer than the learner's close grace


@pytest.mark.parametrize("transport", ["auto", "distributed", "relay"])
def test_a_slow_collector_reads_the_close_after_the_last_version(transport: str) -> None:
    learner = {"w": torch.zeros(NUMEL)}
    mine = {"w": torch.full((NUMEL,), -1.0)}
    with WeightSender(learner, 1, timeout=20, transport=transport) as sender:
        rx = WeightReceiver(mine, sender.connection_info, 0, timeout=20, reattach_timeout=10)
        try:
            with ThreadPoolExecutor(1) as pool:
                joined = pool.submit(rx.connect, 30)
                sender.connect(timeout=30)
                assert joined.result(30) == 0
            learner["w"].fill_(1.0)
            assert sender.send_weights_async() == 1
            sender.close()  # version 1 in flight, or received and not applied yet
            outcomes: list[object] = []
            start = time.monotonic()
            while time.monotonic() - start < 30:
                try:
                    outcomes.append(rx.receive_weights(timeout=0))
                except WeightSyncError as exc:
                    outcomes.append(exc)
                    break
                time.sleep(STEP_S)  # the collector's environment steps
            took = time.monotonic() - start
        finally:
            rx.close()
    assert 1 in outcomes and bool((mine["w"] == 1.0).all()), outcomes
    assert isinstance(outcomes[-1], ClosedError), outcomes
    assert took < 4 * STEP_S, f"ClosedError after {took:.1f}s (waited for a reattach?)"
