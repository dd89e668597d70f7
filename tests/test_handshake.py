"""The handshake's refusals, each at both moments: the initial ``connect()`` and a
run-time join. The collector raises the refusal; the learner raises it where it waits
for that id, and otherwise goes on serving the others."""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor

import pytest
from versioned import RX_TIMEOUT_S, expected, fingerprint, make_weights, publish

from weight_sync import WeightReceiver, WeightSender
from weight_sync.control.channel import Control
from weight_sync.errors import DuplicateCollectorError, LayoutMismatchError

pytestmark = pytest.mark.timeout(90)


def _join(pool: ThreadPoolExecutor, sender: WeightSender, cid: int,
          variant: str = "base") -> tuple[WeightReceiver, Future[int], dict]:
    weights = make_weights(-7, variant=variant)
    rx = WeightReceiver(weights, sender.connection_info, cid, timeout=RX_TIMEOUT_S)
    return rx, pool.submit(rx.connect, 60), weights


def _wait_hellos(sender: WeightSender, hellos: list[tuple[int, int]]) -> None:
    info = sender.connection_info
    Control.connect(info.host, info.port, info.name, 10).wait_hellos(hellos, 60, "hellos")


def test_layout_mismatch_at_connect() -> None:
    with WeightSender(make_weights(0), 1, timeout=RX_TIMEOUT_S) as sender, \
            ThreadPoolExecutor(1) as pool:
        rx, joined, mine = _join(pool, sender, 0, "other_shape")
        with pytest.raises(LayoutMismatchError, match=r"w: shape \(8, 16\)") as err:
            sender.connect(timeout=60)
        assert err.value.differences == joined.exception(60).differences  # type: ignore[union-attr]
        assert fingerprint(mine) == fingerprint(make_weights(-7, variant="other_shape"))
        rx.close()


def test_layout_mismatch_at_run_time() -> None:
    weights = make_weights(0)
    with WeightSender(weights, 1, max_collectors=2, timeout=RX_TIMEOUT_S) as sender, \
            ThreadPoolExecutor(2) as pool:
        rx0, joined0, _ = _join(pool, sender, 0)
        sender.connect(timeout=60)
        assert joined0.result(60) == 0
        rx1, joined1, mine = _join(pool, sender, 1, "other_key")
        with pytest.raises(LayoutMismatchError, match="extra: only on the") as err:
            sender.wait_for([1], timeout=60)
        assert err.value.differences == ["extra: only on the collector"]
        assert isinstance(joined1.exception(60), LayoutMismatchError)
        assert fingerprint(mine) == fingerprint(make_weights(-7, variant="other_key"))
        v = publish(sender, weights)  # the others are served as before
        assert rx0.receive_weights(timeout=30) == v
        assert sender.wait_ack(timeout=30).acked == (0,)
        rx0.close()
        rx1.close()


def test_duplicate_id_at_connect() -> None:
    """Two live processes claim id 0 before the learner connects: the first is served,
    the second refused, and connect() succeeds."""
    weights = make_weights(0)
    with WeightSender(weights, 1, timeout=RX_TIMEOUT_S) as sender, \
            ThreadPoolExecutor(2) as pool:
        first, joined_first, _ = _join(pool, sender, 0)
        _wait_hellos(sender, [(0, 1)])
        second, joined_second, _ = _join(pool, sender, 0)
        _wait_hellos(sender, [(0, 2)])
        sender.connect(timeout=60)
        assert joined_first.result(60) == 0
        with pytest.raises(DuplicateCollectorError, match="duplicate collector id 0"):
            joined_second.result(60)
        v = publish(sender, weights)
        assert first.receive_weights(timeout=30) == v
        assert sender.wait_ack(timeout=30).acked == (0,)
        first.close()
        second.close()


def test_duplicate_id_at_run_time() -> None:
    weights = make_weights(0)
    with WeightSender(weights, 1, timeout=RX_TIMEOUT_S) as sender, \
            ThreadPoolExecutor(2) as pool:
        first, joined_first, mine = _join(pool, sender, 0)
        sender.connect(timeout=60)
        assert joined_first.result(60) == 0
        second, joined_second, _ = _join(pool, sender, 0)
        deadline = time.monotonic() + 60
        while not joined_second.done() and time.monotonic() < deadline:
            sender.wait_ack(timeout=0.5)  # joins are handled inside the learner's calls
        with pytest.raises(DuplicateCollectorError, match=r"incarnation 1 .* is alive"):
            joined_second.result(timeout=0)
        assert sender.wait_for([0], timeout=30).acked == (0,)  # the first still served
        v = publish(sender, weights)
        assert first.receive_weights(timeout=30) == v
        assert fingerprint(mine) == expected(v)
        first.close()
        second.close()


def test_elastic_id_that_joined_during_connect_is_admitted() -> None:
    """Collector 1 (beyond num_collectors) says hello before the learner's connect()
    ends: the next look for joins still judges it (the joins counter will not move for
    it again)."""
    weights = make_weights(0)
    with WeightSender(weights, 1, max_collectors=2, timeout=RX_TIMEOUT_S) as sender, \
            ThreadPoolExecutor(2) as pool:
        elastic, joined_elastic, theirs = _join(pool, sender, 1)
        _wait_hellos(sender, [(1, 1)])
        first, joined_first, _ = _join(pool, sender, 0)
        sender.connect(timeout=60)
        assert joined_first.result(60) == 0
        assert sender.wait_for([1], timeout=30).acked == (0, 1)
        assert joined_elastic.result(30) == 0
        v = publish(sender, weights)
        assert elastic.receive_weights(timeout=30) == v
        assert fingerprint(theirs) == expected(v)
        first.close()
        elastic.close()
