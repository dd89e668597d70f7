"""``send_weights_async(collectors=[...])``: a version for some collectors only.

Semantics (``weight_sync.learner.publisher``): one version counter; each collector id
has a current version (the newest sent to all, or a newer one sent to it); a collector
is only ever sent its current version, also when it re-joins; ``wait_ack`` waits for
each live collector's current version. Sender and receivers in one process (threads).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from weight_sync import WeightReceiver, WeightSender
from weight_sync.errors import ConfigError

pytestmark = pytest.mark.timeout(60)

N = 3


def weights_of(value: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((4, 4), value), "n": torch.tensor(int(value))}


@contextlib.contextmanager
def group() -> Iterator[tuple[WeightSender, dict[str, torch.Tensor],
                              list[WeightReceiver], list[dict[str, torch.Tensor]]]]:
    learner = weights_of(0.0)
    policies = [weights_of(-1.0 - c) for c in range(N)]
    with WeightSender(learner, num_collectors=N, max_collectors=N + 2,
                      timeout=20) as sender, \
            ThreadPoolExecutor(N) as pool:
        receivers = [WeightReceiver(p, sender.connection_info, c, timeout=20)
                     for c, p in enumerate(policies)]
        joined = [pool.submit(rx.connect, 20) for rx in receivers]
        sender.connect(timeout=20)
        assert [j.result(timeout=20) for j in joined] == [0] * N
        try:
            yield sender, learner, receivers, policies
        finally:
            for rx in receivers:
                rx.close()


def set_to(weights: dict[str, torch.Tensor], value: float) -> None:
    weights["w"].fill_(value)
    weights["n"].fill_(int(value))


def holds(policy: dict[str, torch.Tensor], value: float) -> bool:
    return bool((policy["w"] == value).all()) and int(policy["n"]) == int(value)


def test_a_version_for_one_collector_leaves_the_others_alone() -> None:
    with group() as (sender, learner, receivers, policies):
        set_to(learner, 5.0)
        v = sender.send_weights_async(collectors=[1])
        assert v == 1
        assert receivers[1].receive_weights(timeout=20) == v
        ack = sender.wait_ack(timeout=20)  # only collector 1 had something to apply
        assert ack.complete and ack.acked == (0, 1, 2)
        assert holds(policies[1], 5.0)
        for c in (0, 2):
            assert holds(policies[c], 0.0) and receivers[c].version == 0
            assert receivers[c].receive_weights(timeout=0.3) is None  # nothing for them
        assert [sender.current_version(c) for c in range(N)] == [0, 1, 0]

        # A later version for all: everyone gets it (collector 1 goes on from v).
        set_to(learner, 7.0)
        v2 = sender.send_weights_async()
        for rx in receivers:
            assert rx.receive_weights(timeout=20) == v2
        assert sender.wait_ack(timeout=20).complete
        assert all(holds(p, 7.0) for p in policies)


def test_wait_ack_waits_for_the_targeted_collectors_only() -> None:
    with group() as (sender, learner, receivers, policies):
        set_to(learner, 3.0)
        sender.send_weights_async(collectors=[0, 2])
        assert receivers[0].receive_weights(timeout=20) == 1
        # collector 2 has not applied it: wait_ack names it, not collector 1
        result = None
        with pytest.raises(Exception, match=r"collector\(s\) 2") as info:
            sender.wait_ack(timeout=0.5)
        result = info.value.result
        assert result.lagging == (2,) and set(result.acked) == {0, 1}
        assert receivers[2].receive_weights(timeout=20) == 1
        assert sender.wait_ack(timeout=20).complete
        assert holds(policies[0], 3.0) and holds(policies[2], 3.0) and holds(policies[1], 0.0)


def test_a_joining_collector_gets_its_own_current_version() -> None:
    """Collectors that join later (elastic ids) are caught up with their own current
    version: the newest sent to all for one left out of a subset version, the subset's
    for one it named before it joined."""
    with group() as (sender, learner, receivers, _):
        set_to(learner, 4.0)
        sender.send_weights_async()  # v1: all
        set_to(learner, 9.0)
        sender.send_weights_async(collectors=[1, N + 1])  # v2: collector 1 and a future one
        assert [sender.current_version(c) for c in range(N + 2)] == [1, 2, 1, 1, 2]
        with ThreadPoolExecutor(1) as pool:  # wait_ack sends collector 1 v2 after v1
            acked = pool.submit(sender.wait_ack, 20)
            for c, rx in enumerate(receivers):
                while rx.version < sender.current_version(c):
                    assert rx.receive_weights(timeout=20) is not None
            assert acked.result(timeout=20).complete
        late = {c: weights_of(-5.0) for c in (N, N + 1)}
        with ThreadPoolExecutor(2) as pool:
            rxs = {c: WeightReceiver(p, sender.connection_info, c, timeout=20)
                   for c, p in late.items()}
            joined = {c: pool.submit(rx.connect, 20) for c, rx in rxs.items()}
            sender.wait_for([N, N + 1], timeout=20)
            assert {c: j.result(timeout=20) for c, j in joined.items()} == {N: 1, N + 1: 2}
        try:
            assert holds(late[N], 4.0) and holds(late[N + 1], 9.0)
        finally:
            for rx in rxs.values():
                rx.close()


@pytest.mark.parametrize("bad", [[], [N + 5], [-1], [True], ["0"]])
def test_bad_collector_ids_are_refused(bad: list[object]) -> None:
    with group() as (sender, _, _, _):
        with pytest.raises(ConfigError, match="collectors must be"):
            sender.send_weights_async(collectors=bad)  # type: ignore[arg-type]
        assert sender.version == 0  # nothing published
