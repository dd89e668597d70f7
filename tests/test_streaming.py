"""Streamed messages on the ``"distributed"`` transport: a message of two pieces or more
is signalled before it is packed, sent piece by piece as it is packed, header last.

Bit-exact over many versions with the checksum on and off (the collector sees the
pieces land in order); a piece corrupted in transit is refused and sent again; a pack
that fails half-way leaves every collector on its old weights, and the learner can
publish again."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch
from versioned import RX_TIMEOUT_S, fingerprint

from weight_sync import WeightReceiver, WeightSender
from weight_sync.collector.hooks import ReceiverHooks
from weight_sync.transports import TransportSpec, get_transport, register_transport
from weight_sync.transports.distributed_receiver import DistributedReceiver
from weight_sync.transports.distributed_sender import DistributedSender
from weight_sync.transports.streaming import STREAM_PIECE, pieces
from weight_sync.wire.layout import HEADER_BYTES

pytestmark = pytest.mark.timeout(180)

CORRUPTING = "corrupt-stream-test"


def stream_weights(seed: int) -> dict[str, torch.Tensor]:
    """About 13 MB in four leaves: a leaf over one piece, one under, ints and a scalar."""
    gen = torch.Generator().manual_seed(seed)
    return {"big": torch.randn(2_500_000, generator=gen),
            "mid": torch.randn(300, 1000, generator=gen),
            "ids": torch.randint(0, 1 << 30, (50_000,), generator=gen),
            "n": torch.tensor(seed)}


def assign(weights: dict[str, torch.Tensor], seed: int) -> None:
    for name, value in stream_weights(seed).items():
        weights[name].copy_(value)


class CorruptingReceiver(DistributedReceiver):
    """Flips a bit in the second piece of every other delivery (the 2nd, 4th, ...: the
    initial sync lands intact, then each version is corrupted once and its resend is
    not), as the piece lands and before the link hashes it: corruption in transit."""

    corrupted = 0
    deliveries = 0

    def receive(self, note: str, buffer: torch.Tensor | None, timeout: float,
                landed: Callable[[int, int], None] | None = None) -> torch.Tensor:
        assert buffer is not None
        cls = type(self)
        hit = cls.deliveries % 2 == 1
        cls.deliveries += 1
        seen = 0

        def corrupt(start: int, end: int) -> None:
            nonlocal seen
            seen += 1
            if hit and seen == 2:
                buffer[start + 5] ^= 0x10
                cls.corrupted += 1
            if landed is not None:
                landed(start, end)

        return super().receive(note, buffer, timeout, corrupt)


@pytest.fixture()
def corrupting() -> str:
    # the capabilities of the ends it reuses, declared as the built-in declares them
    builtin = get_transport("distributed")
    register_transport(TransportSpec(CORRUPTING, sender=DistributedSender,
                                     receiver=CorruptingReceiver, backends=("gloo",),
                                     streams=builtin.streams,
                                     posts_early=builtin.posts_early),
                       replace=True)
    CorruptingReceiver.corrupted = CorruptingReceiver.deliveries = 0
    return CORRUPTING


@contextlib.contextmanager
def pair(transport: str = "distributed", hooks: ReceiverHooks | None = None,
         **sender_kw: Any) -> Iterator[tuple[WeightSender, WeightReceiver,
                                             dict[str, torch.Tensor], dict[str, torch.Tensor]]]:
    """A sender and one receiver at version 0 (seed 0); both closed afterwards."""
    weights, policy = stream_weights(0), stream_weights(-1)
    with WeightSender(weights, 1, timeout=RX_TIMEOUT_S, transport=transport,
                      **sender_kw) as sender, ThreadPoolExecutor(1) as pool:
        rx = WeightReceiver(policy, sender.connection_info, 0, timeout=RX_TIMEOUT_S,
                            hooks=hooks)
        try:
            joined = pool.submit(rx.connect, 60)
            sender.connect(timeout=60)
            assert joined.result(60) == 0
            assert fingerprint(policy) == fingerprint(weights)
            yield sender, rx, policy, weights
        finally:
            rx.close()


def sync(sender: WeightSender, rx: WeightReceiver) -> int | None:
    """The collector waits for the newest version while the learner sits in
    ``wait_ack`` (whose slices notice a resend request)."""
    with ThreadPoolExecutor(1) as pool:
        acked = pool.submit(sender.wait_ack, 60)
        version = rx.receive_weights(timeout=60)
        acked.result(60)
    return version


def test_pieces_cover_a_message_once_header_last() -> None:
    nbytes = HEADER_BYTES + 2 * STREAM_PIECE + 123
    spans = pieces(nbytes)
    assert spans[-1] == (0, HEADER_BYTES)
    covered = sorted(spans)
    assert covered[0][0] == 0 and covered[-1][1] == nbytes
    assert all(a[1] == b[0] for a, b in itertools.pairwise(covered))
    assert max(e - s for s, e in spans) == STREAM_PIECE


@pytest.mark.parametrize("checksum", [True, False], ids=["checksum", "no-checksum"])
def test_streamed_versions_bit_exact(checksum: bool) -> None:
    landed: list[tuple[int, int]] = []
    hooks = ReceiverHooks(during_receive=lambda version, got: landed.append((version, got)))
    with pair(hooks=hooks, checksum=checksum) as (sender, rx, policy, weights):
        nbytes = sender.wire_layout.nbytes
        for seed in range(1, 9):
            assign(weights, seed)
            assert sender.send_weights_async() == seed
            assert sync(sender, rx) == seed
            assert fingerprint(policy) == fingerprint(stream_weights(seed))
            seen = [got for version, got in landed if version == seed]
            # Every piece reported, in order, the last one completing the message.
            assert len(seen) == len(pieces(nbytes)) >= 4
            assert seen == sorted(seen) and seen[-1] == nbytes
        assert rx.refused == 0
        assert sender.buffers_in_use <= 2


def test_a_piece_corrupted_in_transit_is_refused_and_sent_again(corrupting: str) -> None:
    with pair(transport=corrupting) as (sender, rx, policy, weights):
        assert sender.transports == {0: corrupting}
        for seed in range(1, 4):
            assign(weights, seed)
            sender.send_weights_async()
            assert sync(sender, rx) == seed
            assert fingerprint(policy) == fingerprint(stream_weights(seed))
        assert CorruptingReceiver.corrupted == 3
        assert rx.refused == 3
        assert CorruptingReceiver.deliveries == 7  # the initial sync, then two per version


def test_a_pack_failing_half_way_applies_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    import weight_sync.wire.stamping as stamping

    with pair() as (sender, rx, policy, weights):
        real_pack = stamping.pack
        calls = 0

        def interrupted(sources: Any, views: Any) -> None:
            nonlocal calls
            calls += 1
            if calls == 2:  # the second piece: the first one may already be on its way
                raise KeyboardInterrupt
            real_pack(sources, views)

        monkeypatch.setattr(stamping, "pack", interrupted)
        assign(weights, 1)
        with pytest.raises(KeyboardInterrupt):
            sender.send_weights_async()
        monkeypatch.setattr(stamping, "pack", real_pack)
        assert sender.version == 0  # never published
        # The collector gets the abandoned message and refuses it.
        for _ in range(600):
            if rx.refused:
                break
            assert rx.receive_weights(timeout=0.05) is None
        assert rx.refused == 1
        assert rx.version == 0
        assert fingerprint(policy) == fingerprint(stream_weights(0))
        # Publishing again works, and the number is reused.
        assert sender.send_weights_async() == 1
        assert sync(sender, rx) == 1
        assert fingerprint(policy) == fingerprint(stream_weights(1))
        assert sender.buffers_in_use <= 2
