"""The transport and the sender/receiver, in one process (threads, gloo, TCPStore port 0).

The in-process twin of the multi-process tests: the protocol logic (newest-pending,
acks, close, timeouts, misuse) checked deterministically and fast.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import models
import procs
import pytest
import torch
import torch.distributed as dist
from tensordict import TensorDict

from weight_sync import (
    BufferLayout,
    ClosedError,
    ConfigError,
    ConnectionFailed,
    ConnectionInfo,
    LayoutMismatchError,
    ProtocolError,
    WeightReceiver,
    WeightSender,
    WeightSyncTimeout,
)
from weight_sync.layout import named_leaves
from weight_sync.protocol import Keys
from weight_sync.snapshots import SnapshotPool
from weight_sync.store import connect_client, create_server
from weight_sync.transports import (
    COLLECTOR_RANK,
    LEARNER_RANK,
    DistributedTransport,
    ReceiverLink,
    ReceiverTransport,
    SenderLink,
    SenderTransport,
)

pytestmark = pytest.mark.timeout(60)


@dataclass
class Pair:
    learner: SenderLink
    collector: ReceiverLink
    pool: SnapshotPool
    buffer: torch.Tensor
    policy: TensorDict

    def publish(self, version: int) -> None:
        """Snapshot the (mutated) policy as ``version`` and hand it to the link."""
        models.mutate(self.policy, version)
        snap = self.pool.take(list(named_leaves(self.policy).values()), version)
        self.learner.send_weights_async(snap)
        snap.release()

    def receive(self, timeout: float | None) -> int | None:
        return self.collector.receive_weights(timeout, weights=self.buffer)

    def received(self) -> dict[str, torch.Tensor]:
        layout = self.collector.layout
        return dict(zip([e.name for e in layout.entries], layout.views(self.buffer),
                        strict=True))


@pytest.fixture
def pair() -> Iterator[Pair]:
    policy = models.make_real_policy(seed=0)
    layout = BufferLayout.from_weights(policy)
    keys = Keys("inproc")
    server = create_server("127.0.0.1", 0, timeout=20)
    # One TCPStore client per thread that uses it.
    listener = connect_client("127.0.0.1", server.port, timeout=20)
    acker = connect_client("127.0.0.1", server.port, timeout=20)
    learner = SenderLink(server, keys, 0, 1, layout=layout, timeout=20,
                         bind_host="127.0.0.1")
    collector = ReceiverLink(listener, keys, 0, 1, layout=layout, timeout=20,
                             ack_store=acker, bind_host="127.0.0.1")
    with ThreadPoolExecutor(1) as pool:
        done = pool.submit(collector.connect)
        learner.connect()
        done.result(timeout=30)
    buffer = torch.zeros(layout.nbytes, dtype=torch.uint8)
    yield Pair(learner, collector, SnapshotPool(layout, torch.device("cpu")), buffer, policy)
    collector.close()
    learner.close()


def test_each_end_satisfies_its_protocol_and_only_its_own(pair: Pair) -> None:
    assert isinstance(pair.learner, SenderTransport)
    assert isinstance(pair.collector, ReceiverTransport)
    assert not isinstance(pair.learner, ReceiverTransport)
    assert not isinstance(pair.collector, SenderTransport)
    # torchrl's name builds the end that matches the rank
    args = (dist.HashStore(), Keys("x"), 3, 1)
    layout = pair.learner.layout
    assert isinstance(DistributedTransport(*args, rank=LEARNER_RANK, layout=layout), SenderLink)
    assert isinstance(DistributedTransport(*args, rank=COLLECTOR_RANK, layout=layout),
                      ReceiverLink)
    with pytest.raises(ConfigError, match="rank must be 0 or 1, got 2"):
        DistributedTransport(*args, rank=2, layout=layout)


def test_versions_arrive_bit_exact(pair: Pair) -> None:
    for version in range(1, 6):
        pair.publish(version)
        expected = models.fingerprint(pair.policy)
        models.mutate(pair.policy, 100)  # learner steps while the bytes are in flight
        assert pair.receive(10) == version
        assert models.fingerprint(pair.received()) == expected
        pair.collector.ack(version)
        pair.learner.wait_ack(10)
        assert pair.learner.acked_version == version
        assert pair.learner.waiting_key is None


def test_slow_collector_gets_in_flight_then_newest(pair: Pair) -> None:
    """The guarantee: at most one message in flight per link; newer versions replace
    the pending one. A collector that stops acking after version v gets, when it
    resumes, the one version that was already in flight (v+1), then the newest."""
    pair.publish(1)
    newest = {}
    for version in (2, 3, 4, 5):
        pair.publish(version)
        newest[version] = models.fingerprint(pair.policy)
    assert pair.learner.target_version == 5
    assert pair.pool.allocated <= 3  # in flight + pending (+ one being replaced)
    assert pair.receive(10) == 1
    pair.collector.ack(1)
    assert pair.receive(0) is None  # nothing sent until the learner sees the ack
    pair.learner.progress()
    assert pair.receive(10) == 5  # 2, 3 and 4 were never sent
    assert models.fingerprint(pair.received()) == newest[5]
    pair.collector.ack(5)
    pair.learner.wait_ack(10)
    assert pair.learner.acked_version == 5
    assert len(pair.pool.free) == pair.pool.allocated  # every snapshot came back


def test_poll_never_blocks_and_bounded_receive_returns_none(pair: Pair) -> None:
    start = time.monotonic()
    for _ in range(50):
        assert pair.receive(0) is None
    assert time.monotonic() - start < 5  # hang guard, not a speed claim
    start = time.monotonic()
    assert pair.receive(0.2) is None
    assert 0.15 < time.monotonic() - start < 5
    pair.collector.timeout = 0.2  # timeout=None waits up to the link's timeout, then raises
    with pytest.raises(WeightSyncTimeout, match="message 0 from the learner"):
        pair.receive(None)


def test_wait_ack_timeout_names_collector_and_version(pair: Pair) -> None:
    pair.publish(1)
    assert pair.receive(10) == 1  # received, never acked
    start = time.monotonic()
    with pytest.raises(WeightSyncTimeout, match=r"collector 0 .* did not ack version 1"):
        pair.learner.wait_ack(0.3)
    assert 0.25 < time.monotonic() - start < 10


def test_learner_close_reaches_collector_as_closed(pair: Pair) -> None:
    pair.publish(1)
    assert pair.receive(10) == 1
    pair.collector.ack(1)
    pair.learner.wait_ack(10)
    pair.learner.close()
    pair.learner.close()  # idempotent
    with pytest.raises(ClosedError, match="learner closed"):
        pair.receive(10)
    with pytest.raises(ClosedError):
        pair.learner.send_weights_async(pair.pool.take(
            list(named_leaves(pair.policy).values()), 2))


def test_link_misuse_is_a_protocol_error(pair: Pair) -> None:
    layout = pair.learner.layout
    fresh = SenderLink(dist.HashStore(), Keys("x"), 3, 1, layout=layout)
    with pytest.raises(ProtocolError, match=r"before connect\(\).*collector 3"):
        fresh.progress()
    fresh_rx = ReceiverLink(dist.HashStore(), Keys("x"), 3, 1, layout=layout)
    with pytest.raises(ProtocolError, match=r"before connect\(\).*collector 3"):
        fresh_rx.receive_weights(0, weights=pair.buffer)
    with pytest.raises(ConfigError, match="backend"):
        SenderLink(dist.HashStore(), Keys("x"), 3, 1, layout=layout, backend="mpi")


def test_torn_message_is_refused(pair: Pair) -> None:
    """A message whose header version differs from the announced one is refused."""
    snap = pair.pool.take(list(named_leaves(pair.policy).values()), 7)
    snap.version = 8  # announce 8, carry 7 in the header
    pair.learner.send_weights_async(snap)
    snap.release()
    with pytest.raises(ProtocolError, match="announced as version 8 carries version 7"):
        pair.receive(10)


# -- WeightSender / WeightReceiver in one process --------------------------------------
@contextlib.contextmanager
def connected(policy: Any, collector_policy: Any) -> Iterator[tuple[WeightSender,
                                                                   WeightReceiver]]:
    """A sender and one receiver (connected from a thread) at version 0; both closed."""
    with WeightSender(policy, num_collectors=1, timeout=20) as sender, \
            ThreadPoolExecutor(1) as pool:
        receiver = WeightReceiver(collector_policy, sender.connection_info, 0, timeout=20)
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
        client = connect_client(info.host, info.port, timeout=10)
        client.add(Keys(info.name).join(0), 1)
        start = time.monotonic()
        with pytest.raises(WeightSyncTimeout) as err:
            sender.connect(timeout=0.5)
        elapsed = time.monotonic() - start
    msg = str(err.value)
    assert Keys(info.name).join(1) in msg and Keys(info.name).join(0) not in msg.split(
        "missing")[-1]
    assert 0.4 < elapsed < 0.5 + 5


def test_receiver_connect_without_store_fails(mlp: torch.nn.Module) -> None:
    port = procs.free_port()
    info = ConnectionInfo(host="127.0.0.1", port=port, name="policy",
                          layout_digest=BufferLayout.from_weights(mlp).digest, num_collectors=1)
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
    info = ConnectionInfo(host="127.0.0.1", port=1, name="policy", layout_digest="x",
                          num_collectors=2)
    for bad in (-1, 2, "0", 1.0):
        with pytest.raises(ValueError, match=f"got {bad!r}"):
            WeightReceiver(mlp, info, collector_id=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ConnectionInfo"):
        WeightReceiver(mlp, {"port": 1}, collector_id=0)  # type: ignore[arg-type]


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
        counts = []
        for version in range(1, 61):
            assert sender.send_weights_async() == version
            assert receiver.receive_weights(timeout=20) == version
            assert sender.wait_ack(20).complete
            if version in (10, 60):
                counts.append(sender._store.num_keys())
        assert counts[1] <= counts[0] + 2, counts  # the newest few, not one per version
