"""Small messages on the ``"distributed"`` transport land in a receive the collector
posted before their signal (:meth:`DistributedReceiver.post`), so their bytes flow as
soon as the learner sends them.

Bit-exact over many versions, also when a message is corrupted in transit and sent
again into the same posted buffer; never posted where the next message's size is
unknown (changed-only streams), where a ``before_receive`` hook must run before the
bytes land, or for messages past the size limit."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch
from versioned import RX_TIMEOUT_S

from weight_sync import ConnectionInfo, WeightReceiver, WeightSender
from weight_sync.collector.hooks import ReceiverHooks
from weight_sync.errors import ConfigError
from weight_sync.transports.base import LinkSpec
from weight_sync.transports.distributed_receiver import (
    POST_EARLY_BELOW,
    DistributedReceiver,
    posts_early,
)
from weight_sync.wire.layout import HEADER_BYTES, BufferLayout

pytestmark = pytest.mark.timeout(120)


def weights(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(64, 33, generator=gen), "b": torch.randn(33, generator=gen),
            "frozen": torch.randn(500, generator=gen),
            "step": torch.tensor(seed, dtype=torch.int64)}


@pytest.fixture
def early(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts the messages that landed in a receive posted before their signal, and
    the receives posted."""
    counts = {"posted": 0, "landed_early": 0, "received": 0}
    real_post, real_receive = DistributedReceiver.post, DistributedReceiver.receive

    def post(self: DistributedReceiver, buffer: torch.Tensor) -> None:
        counts["posted"] += self._posted is None
        real_post(self, buffer)

    def receive(self: DistributedReceiver, note: str, buffer: torch.Tensor | None,
                timeout: float, landed: Callable[[int, int], None] | None = None
                ) -> torch.Tensor:
        counts["received"] += 1
        counts["landed_early"] += self._posted is not None
        return real_receive(self, note, buffer, timeout, landed)

    monkeypatch.setattr(DistributedReceiver, "post", post)
    monkeypatch.setattr(DistributedReceiver, "receive", receive)
    return counts


@contextlib.contextmanager
def connected(source: dict[str, torch.Tensor], hooks: ReceiverHooks | None = None,
              **sender_kw: Any) -> Iterator[tuple[WeightSender, WeightReceiver,
                                                  dict[str, torch.Tensor]]]:
    policy = weights(-1)
    with WeightSender(source, num_collectors=1, timeout=RX_TIMEOUT_S, transport="distributed",
                      **sender_kw) as sender, \
            ThreadPoolExecutor(1) as pool:
        receiver = WeightReceiver(policy, sender.connection_info, 0, timeout=RX_TIMEOUT_S,
                                  hooks=hooks)
        joined = pool.submit(receiver.connect, RX_TIMEOUT_S)
        sender.connect(timeout=RX_TIMEOUT_S)
        assert joined.result(timeout=RX_TIMEOUT_S) == 0
        try:
            yield sender, receiver, policy
        finally:
            receiver.close()


def rounds(sender: WeightSender, receiver: WeightReceiver, source: dict[str, torch.Tensor],
           policy: dict[str, torch.Tensor], count: int, change: Callable[[int], None]) -> None:
    """``count`` versions, each bit-exact on the collector once applied."""
    for i in range(count):
        change(i)
        version = sender.send_weights_async()
        assert receiver.receive_weights(timeout=RX_TIMEOUT_S) == version
        sender.wait_ack(RX_TIMEOUT_S)
        for name, value in source.items():
            assert torch.equal(policy[name], value), f"{name} differs at version {version}"


def test_every_small_message_lands_in_a_receive_posted_before_its_signal(
        early: dict[str, int]) -> None:
    source = weights(0)
    with connected(source) as (sender, receiver, policy):
        def change(i: int) -> None:
            source["w"].add_(1.0)
            source["step"].fill_(i + 1)

        rounds(sender, receiver, source, policy, 20, change)
    assert early["received"] == 21  # the initial sync, then 20 versions
    assert early["landed_early"] == 21


def test_a_message_corrupted_in_transit_is_sent_again_into_the_posted_buffer(
        early: dict[str, int]) -> None:
    flipped: list[int] = []

    def flip_once(version: int, message: torch.Tensor) -> None:
        if version == 2 and not flipped:
            flipped.append(version)
            message[HEADER_BYTES + 5] ^= 4

    source = weights(0)
    with connected(source, ReceiverHooks(after_receive=flip_once)) as (sender, receiver,
                                                                       policy):
        with ThreadPoolExecutor(1) as pool:
            def one(i: int) -> None:
                source["b"].mul_(2.0)

            for i in range(4):
                one(i)
                version = sender.send_weights_async()
                acked = pool.submit(sender.wait_ack, RX_TIMEOUT_S)  # serves the resend
                assert receiver.receive_weights(timeout=RX_TIMEOUT_S) == version
                acked.result(timeout=RX_TIMEOUT_S)
                assert all(torch.equal(policy[k], v) for k, v in source.items())
        assert receiver.refused == 1
    assert flipped == [2]
    assert early["received"] == 6  # initial, 4 versions, one resend
    assert early["landed_early"] == 6


def test_no_early_receive_on_a_changed_only_stream(early: dict[str, int]) -> None:
    """Changed-only messages have the size of their changed leaves, known from the
    signal only: a receive of the whole size posted before it would not match."""
    source = weights(0)
    with connected(source, changed_only=True) as (sender, receiver, policy):
        assert receiver.info.changed_only
        gen = torch.Generator().manual_seed(3)

        def change(i: int) -> None:
            for name in ("w", "b", "step"):  # "frozen" never changes
                if torch.rand(1, generator=gen).item() < 0.5:
                    source[name].add_(1)

        rounds(sender, receiver, source, policy, 10, change)
        assert sender.stats.changed_only_sent > 0
    assert early["posted"] == 0 and early["landed_early"] == 0
    assert early["received"] >= 11


def test_no_early_receive_with_a_before_receive_hook(early: dict[str, int]) -> None:
    """The hook's contract is to run before the bytes land."""
    seen: list[int] = []
    source = weights(0)
    with connected(source, ReceiverHooks(before_receive=lambda v, b: seen.append(v))) as (
            sender, receiver, policy):
        rounds(sender, receiver, source, policy, 3, lambda i: source["b"].add_(i))
    assert seen == [0, 1, 2, 3]
    assert early["posted"] == 0 and early["received"] == 4


def test_only_small_gloo_messages_post_early() -> None:
    def spec(nbytes: int, backend: str = "gloo") -> LinkSpec:
        layout = BufferLayout.from_tensors({"w": torch.zeros(nbytes // 4, dtype=torch.float32)})
        return LinkSpec(0, 1, layout, backend=backend)

    assert posts_early(spec(POST_EARLY_BELOW // 2))
    assert not posts_early(spec(POST_EARLY_BELOW))
    assert not posts_early(spec(POST_EARLY_BELOW // 2, "nccl"))


def test_connection_info_changed_only_must_be_a_bool() -> None:
    with pytest.raises(ConfigError, match="changed_only must be a bool, got 'yes'"):
        ConnectionInfo(host="127.0.0.1", port=1, name="p", num_collectors=1,
                       changed_only="yes")  # type: ignore[arg-type]
