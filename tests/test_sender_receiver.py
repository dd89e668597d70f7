"""WeightSender and WeightReceiver in one process (threads, TCPStore port 0): the
protocol logic (misuse, timeouts, the background receive, close) checked fast and
deterministically. What crosses a process boundary is in the multi-process tests."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import harness
import models
import pytest
import torch
from tensordict import TensorDict

from weight_sync import (
    ConnectionInfo,
    WeightReceiver,
    WeightSender,
    WeightSyncError,
    WeightSyncTimeout,
)
from weight_sync.collector.hooks import ReceiverHooks
from weight_sync.control.channel import Control
from weight_sync.control.store import connect_client
from weight_sync.errors import ClosedError, ConnectionFailed, LayoutMismatchError, ProtocolError
from weight_sync.wire.protocol import Keys

pytestmark = pytest.mark.timeout(60)


@contextlib.contextmanager
def connected(policy: Any, collector_policy: Any, *, hooks: ReceiverHooks | None = None,
              rx_timeout: float = 20) -> Iterator[tuple[WeightSender, WeightReceiver]]:
    """A sender and one receiver (connected from a thread) at version 0; both closed."""
    with WeightSender(policy, num_collectors=1, timeout=20) as sender, \
            ThreadPoolExecutor(1) as pool:
        receiver = WeightReceiver(collector_policy, sender.connection_info, 0,
                                  timeout=rx_timeout, hooks=hooks)
        joined = pool.submit(receiver.connect, 20)
        sender.connect(timeout=20)
        assert joined.result(timeout=20) == 0
        try:
            yield sender, receiver
        finally:
            receiver.close()



def test_sender_misuse_before_connect_and_after_close(mlp: torch.nn.Module) -> None:
    sender = WeightSender(mlp, num_collectors=1)
    assert sender.connection_info.port > 0
    with pytest.raises(ProtocolError, match=r"wait_ack\(\) before connect"):
        sender.wait_ack(1)
    with pytest.raises(ProtocolError, match=r"send_weights_async\(\) before connect"):
        sender.send_weights_async()
    sender.close()
    sender.close()  # idempotent
    for call in (lambda: sender.connect(1), sender.send_weights_async,
                 lambda: sender.wait_ack(1), lambda: sender.send_weights(timeout=1)):
        with pytest.raises(ClosedError, match="after close"):
            call()


def test_sender_connect_timeout_names_missing_collector(mlp: torch.nn.Module) -> None:
    with WeightSender(mlp, num_collectors=2) as sender:
        info = sender.connection_info
        # Collector 0 joins (its first protocol step); collector 1 never shows up.
        Control.connect(info.host, info.port, info.name, timeout=10).join(0)
        start = time.monotonic()
        with pytest.raises(WeightSyncTimeout) as err:
            sender.connect(timeout=0.5)
        elapsed = time.monotonic() - start
    msg = str(err.value)
    assert Keys(info.name).join(1) in msg and Keys(info.name).join(0) not in msg.split(
        "missing")[-1]
    assert 0.4 < elapsed < 0.5 + 5


def test_receiver_connect_without_store_fails(mlp: torch.nn.Module) -> None:
    port = harness.free_port()
    info = ConnectionInfo(host="127.0.0.1", port=port, name="policy", num_collectors=1)
    receiver = WeightReceiver(mlp, info, collector_id=0)
    start = time.monotonic()
    with pytest.raises(ConnectionFailed, match=f"127.0.0.1:{port}"):
        receiver.connect(timeout=1.0)
    assert time.monotonic() - start < 10  # torch retries once: ~2x, still bounded
    with pytest.raises(ProtocolError, match=r"before connect\(\)"):
        receiver.receive_weights(0)
    receiver.close()
    with pytest.raises(ClosedError, match="after close"):
        receiver.receive_weights(0)
    with pytest.raises(ClosedError, match="after close"):
        receiver.connect(1)


def test_receiver_rejects_bad_arguments(mlp: torch.nn.Module) -> None:
    info = ConnectionInfo(host="127.0.0.1", port=1, name="policy", num_collectors=2)
    for bad in (-1, 2, "0", 1.0):
        with pytest.raises(ValueError, match=f"got {bad!r}"):
            WeightReceiver(mlp, info, collector_id=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ConnectionInfo"):
        WeightReceiver(mlp, {"port": 1}, collector_id=0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"learner_timeout must exceed .*\(1.0s\), got 1.0"):
        WeightReceiver(mlp, info, collector_id=0, learner_timeout=1.0)


def test_sync_in_one_process_with_weights_argument(real_policy: TensorDict) -> None:
    collector_policy = models.make_real_policy(seed=9)
    with connected(real_policy, collector_policy) as (sender, receiver):
        assert models.fingerprint(collector_policy) == models.fingerprint(real_policy)

        # weights= sends another container of the same layout, not the policy.
        other = models.make_real_policy(seed=4)
        version = sender.send_weights_async(weights=other)
        assert receiver.receive_weights(timeout=20) == version == 1
        result = sender.wait_ack(20)
        assert result.complete and result.acked == (0,) and result.version == 1
        assert models.fingerprint(collector_policy) == models.fingerprint(other)
        assert sender.stats.last is not None and sender.stats.last.version == 1

        wrong = TensorDict({"x": torch.zeros(3)}, batch_size=[])
        with pytest.raises(LayoutMismatchError) as err:
            sender.send_weights_async(weights=wrong)
        assert "x: only on the" in str(err.value)
        assert sender.version == 1  # refused before a version was spent
        assert receiver.receive_weights(timeout=0) is None


def test_store_keys_stay_bounded_over_many_versions(mlp: torch.nn.Module) -> None:
    """Spent update and ack keys are deleted: a long run does not grow the store."""
    with connected(mlp, models.make_mlp(seed=3)) as (sender, receiver):
        info = sender.connection_info
        store = connect_client(info.host, info.port, timeout=10)
        counts = []
        for version in range(1, 61):
            assert sender.send_weights_async() == version
            assert receiver.receive_weights(timeout=20) == version
            assert sender.wait_ack(20).complete
            if version in (10, 60):
                counts.append(store.num_keys())
        assert counts[1] <= counts[0] + 2, counts  # the newest few, not one per version


def test_poll_never_blocks_and_bounded_waits_return_or_raise(mlp: torch.nn.Module) -> None:
    with connected(mlp, models.make_mlp(seed=3), rx_timeout=0.3) as (_sender, receiver):
        start = time.monotonic()
        for _ in range(50):
            assert receiver.receive_weights(timeout=0) is None
        assert time.monotonic() - start < 5  # hang guard, not a speed claim
        start = time.monotonic()
        assert receiver.receive_weights(timeout=0.2) is None
        assert 0.15 < time.monotonic() - start < 5
        # timeout=None waits up to the receiver's timeout, then raises naming the version
        with pytest.raises(WeightSyncTimeout, match=r"collector 0: no new weights after "
                                                    r"version 0 within 0\.30s"):
            receiver.receive_weights(timeout=None)


def test_wait_ack_timeout_names_collector_and_version(mlp: torch.nn.Module) -> None:
    with connected(mlp, models.make_mlp(seed=3)) as (sender, _receiver):
        sender.send_weights_async()  # received in the background, never applied nor acked
        start = time.monotonic()
        with pytest.raises(WeightSyncTimeout, match=r"version 1 not acked after .* by "
                                                    r"collector\(s\) 0 \(acked 0\)"):
            sender.wait_ack(0.3)
        assert 0.25 < time.monotonic() - start < 10


def test_torn_message_is_refused(mlp: torch.nn.Module) -> None:
    """A message whose header names another version than its signal is refused."""
    def rewrite_version(version: int, buffer: torch.Tensor) -> None:
        if version >= 1:  # not the initial sync
            buffer[:64].view(torch.int64)[1] = version + 6

    policy = models.make_mlp(seed=3)
    with connected(mlp, policy, hooks=ReceiverHooks(after_receive=rewrite_version)) as (
            sender, receiver):
        before = models.fingerprint(policy)
        sender.send_weights_async()
        with pytest.raises(ProtocolError, match="announced as version 1 carries version 7"):
            receiver.receive_weights(timeout=20)
        assert models.fingerprint(policy) == before


def test_background_failure_is_the_streams_error_not_a_timeout(mlp: torch.nn.Module) -> None:
    """Any exception in the receiver's background thread, not only weight-sync's own,
    is raised by the next receive_weights, at once."""
    def explode(version: int, buffer: torch.Tensor | None) -> None:
        if version >= 1:
            raise RuntimeError("disk on fire")

    with connected(mlp, models.make_mlp(seed=3),
                   hooks=ReceiverHooks(before_receive=explode)) as (sender, receiver):
        sender.send_weights_async()
        start = time.monotonic()
        with pytest.raises(WeightSyncError, match="disk on fire") as err:
            receiver.receive_weights(timeout=None)  # would wait 20 s for nothing
        assert time.monotonic() - start < 10
        assert isinstance(err.value.__cause__, RuntimeError)
        with pytest.raises(WeightSyncError, match="disk on fire"):
            receiver.receive_weights(timeout=0)  # and it stays the stream's error


def _socket_fds() -> int:
    return sum(os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
               for fd in os.listdir("/proc/self/fd") if os.path.exists(f"/proc/self/fd/{fd}"))


def _sync_and_close() -> tuple[int, int, int, bool]:
    """In a fresh process: sockets before, during and after a sender + receiver run,
    and whether the store port still answers after close."""
    import gc

    before = _socket_fds()
    with connected(models.make_mlp(seed=0), models.make_mlp(seed=3)) as (sender, receiver):
        port = sender.connection_info.port
        sender.send_weights_async()
        assert receiver.receive_weights(timeout=20) == 1
        sender.wait_ack(20)
        during = _socket_fds()
    del sender, receiver
    gc.collect()
    deadline = time.monotonic() + 10
    while _socket_fds() > before and time.monotonic() < deadline:
        time.sleep(0.05)  # the store's server thread closes its sockets as it stops
    try:
        connect_client("127.0.0.1", port, timeout=0.5)
        answers = True
    except ConnectionFailed:
        answers = False
    return before, during, _socket_fds(), answers


def test_close_releases_sockets_and_stops_the_store() -> None:
    """close() shuts the pair groups down, releases every store client and stops the
    store server: no socket of the run is left open, and the port no longer answers."""
    ((before, during, after, answers),) = harness.run_processes([(_sync_and_close, ())],
                                                                timeout=60)
    assert during > before
    assert after <= before, f"{after - before} socket(s) left open after close"
    assert not answers
