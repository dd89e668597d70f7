"""Edge probes of the public calls, each fixed and kept fixed (issue 24): the sender
used from several threads (P5), a second ``connect()`` (P6), leaves whose dotted
names collide (P7), and typed errors for bad arguments instead of ``ValueError``,
``TypeError``, ``OverflowError`` or ``RuntimeError`` from deep inside (P9).

In one process (receivers in threads): no process boundary is at stake here.
"""

from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch
from tensordict import TensorDict
from versioned import RX_TIMEOUT_S, expected, fingerprint, make_weights, set_version

from weight_sync import ConnectionInfo, WeightReceiver, WeightSender
from weight_sync.control.discovery import ADDR_VAR, info_from_address, info_from_env
from weight_sync.errors import ConfigError, InvalidWeightsError, ProtocolError
from weight_sync.wire.layout import named_leaves

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def pair() -> Any:
    """A connected learner and collector (version 0 applied); both closed after."""
    sender = WeightSender(make_weights(0), 1, timeout=RX_TIMEOUT_S)
    mine = make_weights(-7)
    rx = WeightReceiver(mine, sender.connection_info, 0, timeout=RX_TIMEOUT_S)
    try:
        with ThreadPoolExecutor(1) as pool:
            joined = pool.submit(rx.connect, 30)
            sender.connect(timeout=30)
            assert joined.result(30) == 0
        yield sender, rx, mine
    finally:
        rx.close()
        sender.close()


# -- P5: the sender from several threads ----------------------------------------------
def test_sends_from_two_threads_get_distinct_versions_all_received_in_order(
        pair: Any) -> None:
    sender, rx, mine = pair
    per_thread = 40
    start = threading.Barrier(2)

    def send_many() -> list[int]:
        start.wait(10)
        return [sender.send_weights_async() for _ in range(per_thread)]

    with ThreadPoolExecutor(2) as pool:
        runs = [pool.submit(send_many) for _ in range(2)]
        versions = [v for run in runs for v in run.result(60)]
    assert sorted(versions) == list(range(1, 2 * per_thread + 1)), "a version handed out twice"
    with ThreadPoolExecutor(1) as pool:
        acking = pool.submit(sender.wait_ack, 60)  # moves the link on as acks come
        last = 0
        while last < 2 * per_thread:  # the newest arrives; nothing out of order on the way
            got = rx.receive_weights(timeout=RX_TIMEOUT_S)
            assert got is not None and got > last
            last = got
        assert acking.result(60).complete
    assert fingerprint(mine) == expected(0)  # every version sent the same weights
    assert sender.buffers_in_use <= 3


def test_wait_ack_in_one_thread_never_holds_up_sends_in_another(pair: Any) -> None:
    sender, rx, _ = pair
    sender.send_weights_async()  # not received yet: a wait_ack on it blocks
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(sender.wait_ack, 30)
        for _ in range(5):
            assert not waiting.done()
            sender.send_weights_async()  # returns while the other thread waits
        while rx.receive_weights(timeout=RX_TIMEOUT_S) != sender.version:
            pass
        assert waiting.result(30).complete
    assert sender.wait_ack(timeout=30).complete


# -- P6: a second connect --------------------------------------------------------------
def test_a_second_connect_is_refused_and_the_stream_goes_on(pair: Any) -> None:
    sender, rx, mine = pair
    with pytest.raises(ProtocolError, match="already connected"):
        rx.connect(timeout=5)
    weights = make_weights(0)
    set_version(weights, 1)
    v = sender.send_weights_async(weights)
    assert rx.receive_weights(timeout=RX_TIMEOUT_S) == v
    assert sender.wait_ack(timeout=30).acked == (0,)
    assert fingerprint(mine) == expected(1)
    assert not sender.failed


def test_the_learner_connects_once() -> None:
    with WeightSender(make_weights(0), 1, timeout=RX_TIMEOUT_S) as sender:
        rx = WeightReceiver(make_weights(-7), sender.connection_info, 0, timeout=RX_TIMEOUT_S)
        with ThreadPoolExecutor(1) as pool:
            joined = pool.submit(rx.connect, 30)
            sender.connect(timeout=30)
            assert joined.result(30) == 0
        with pytest.raises(ProtocolError, match="twice"):
            sender.connect(timeout=5)
        rx.close()


# -- P7: dotted names that collide -----------------------------------------------------
def test_nested_and_dotted_keys_with_one_name_are_refused_naming_both() -> None:
    weights = TensorDict({"a.b": torch.zeros(2), "a": {"b": torch.ones(2)}}, [])
    with pytest.raises(InvalidWeightsError, match=r"'a\.b'.*\('a', 'b'\)"):
        named_leaves(weights)
    with pytest.raises(InvalidWeightsError, match="both have the name"):
        WeightSender(weights, 1)


# -- P9: typed errors for bad arguments ------------------------------------------------
BAD_TIMEOUTS = [math.nan, math.inf, None, -1.0, True, "3"]


@pytest.mark.parametrize("timeout", BAD_TIMEOUTS, ids=repr)
def test_bad_timeouts_are_config_errors(pair: Any, timeout: Any) -> None:
    sender, rx, _ = pair
    with pytest.raises(ConfigError, match="timeout"):
        sender.wait_ack(timeout=timeout)
    with pytest.raises(ConfigError, match="timeout"):
        sender.wait_for([0], timeout=timeout)
    if timeout is not None:  # None: wait up to config.timeout, as documented
        with pytest.raises(ConfigError, match="timeout"):
            rx.receive_weights(timeout=timeout)
    with pytest.raises((ConfigError, ProtocolError)):  # already connected: either says no
        rx.connect(timeout=timeout)
    info = sender.connection_info
    with pytest.raises(ConfigError, match="timeout"):
        info_from_address(info.host, info.port, timeout=timeout)
    fresh = WeightSender(make_weights(0), 1, timeout=RX_TIMEOUT_S)
    try:
        with pytest.raises(ConfigError, match="timeout"):
            fresh.connect(timeout=timeout)
        other = WeightReceiver(make_weights(0), fresh.connection_info, 0)
        with pytest.raises(ConfigError, match="timeout"):
            other.connect(timeout=timeout)
        other.close()
    finally:
        fresh.close()
    assert rx.receive_weights(timeout=0) is None  # the stream is untouched


@pytest.mark.parametrize("port", [99999, 0, -1, True])
def test_bad_ports_are_config_errors(port: int) -> None:
    with pytest.raises(ConfigError, match="port"):
        info_from_address("127.0.0.1", port, timeout=1)
    with pytest.raises(ConfigError, match="port"):
        info_from_env({ADDR_VAR: f"127.0.0.1:{port}"}, timeout=1)
    with pytest.raises(ConfigError, match="port"):
        ConnectionInfo(host="127.0.0.1", port=port, name="policy", num_collectors=1)
    with pytest.raises(ConfigError, match="port"):
        WeightSender(make_weights(0), 1, port=port if port != 0 else 65536)


def test_bool_is_not_an_id_nor_a_count() -> None:
    weights = make_weights(0)
    with pytest.raises(ConfigError, match="num_collectors"):
        WeightSender(weights, True)
    with pytest.raises(ConfigError, match="max_collectors"):
        WeightSender(weights, 1, max_collectors=True)
    info = ConnectionInfo(host="127.0.0.1", port=1, name="policy", num_collectors=2)
    with pytest.raises(ConfigError, match="collector_id"):
        WeightReceiver(make_weights(0), info, True)
    with pytest.raises(ConfigError, match="num_collectors"):
        ConnectionInfo(host="127.0.0.1", port=1, name="policy", num_collectors=True)


def test_non_string_names_are_invalid_weights() -> None:
    with pytest.raises(InvalidWeightsError, match="names must be strings"):
        WeightSender({1: torch.zeros(2), "b": torch.zeros(2)}, 1)


@pytest.mark.parametrize("wire_dtype", ["", "bfloat16"])
def test_a_collector_leaf_sharing_memory_is_refused_at_construction(wire_dtype: str) -> None:
    shared = {"e": torch.zeros(1, 4).expand(3, 4), "f": torch.zeros(3)}
    info = ConnectionInfo(host="127.0.0.1", port=1, name="policy", num_collectors=1,
                          wire_dtype=wire_dtype)
    with pytest.raises(InvalidWeightsError, match=r"'e' has elements sharing memory"):
        WeightReceiver(shared, info, 0)
