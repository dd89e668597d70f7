"""Packing and checksumming at once (:class:`~weight_sync.wire.stamping.Stamper`): the same
message, header included, as packing and then hashing."""

from __future__ import annotations

import pytest
import torch

from weight_sync.errors import IntegrityError
from weight_sync.wire.hashing import CRC32, XXH3_64, Checksum, checksum
from weight_sync.wire.layout import HEADER_BYTES, BufferLayout
from weight_sync.wire.packing import check_payload, host_bytes, pack, write_header
from weight_sync.wire.stamping import PIECE_BYTES, Stamper

pytestmark = pytest.mark.timeout(120)


def _leaves() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    big = PIECE_BYTES // 4
    return {
        "small.a": torch.randn(100, generator=gen),
        "big": torch.randn(3 * big + 17, generator=gen),  # split into several pieces
        "small.b": torch.randint(-9, 9, (33,), generator=gen),
        "transposed": torch.randn(1500, 1100, generator=gen).t(),  # > a piece, not split
        "tiny": torch.ones(3, dtype=torch.bool),
        "mid": torch.randn(big // 3, generator=gen).half(),
        "last_big": torch.randn(big + 1, generator=gen, dtype=torch.float64),
    }


def _reference(layout: BufferLayout, sources: list[torch.Tensor], version: int
               ) -> torch.Tensor:
    buffer = torch.full((layout.nbytes,), 0x5A, dtype=torch.uint8)
    pack(sources, layout.views(buffer))
    write_header(buffer, layout, version, checksum=True)
    return buffer


def test_stamped_message_equals_pack_then_hash() -> None:
    leaves = _leaves()
    assert not leaves["transposed"].is_contiguous()
    layout = BufferLayout.from_tensors(leaves)
    assert layout.nbytes > 4 * PIECE_BYTES
    sources = [leaves[e.name] for e in layout.entries]  # the layout's (sorted) order
    stamper = Stamper(layout, checksum=True)
    try:
        for version in (1, 2):
            buffer = torch.full((layout.nbytes,), 0x5A, dtype=torch.uint8)
            stamper.pack(sources, layout.views(buffer), buffer, version)
            assert torch.equal(buffer, _reference(layout, sources, version))
            check_payload(buffer, "test")  # its own header's checksum holds
            sources = [s + 1 if s.dtype.is_floating_point else s for s in sources]
    finally:
        stamper.close()


@pytest.mark.parametrize("threads", [1, 2])
def test_unchecksummed_message_packed_in_two_halves_is_whole(threads: int) -> None:
    """Without a checksum and with torch on one thread, the stamper's second thread
    packs the back half: the message is the same, and the progress reported only
    ever covers bytes already packed, ending with the whole payload."""
    leaves = _leaves()
    layout = BufferLayout.from_tensors(leaves)
    sources = [leaves[e.name] for e in layout.entries]
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    stamper = Stamper(layout, checksum=False)
    try:
        buffer = torch.full((layout.nbytes,), 0x5A, dtype=torch.uint8)
        views = layout.views(buffer)
        reported: list[int] = []
        expected = torch.full((layout.nbytes,), 0x5A, dtype=torch.uint8)
        pack(sources, layout.views(expected))
        write_header(expected, layout, 3)

        def progress(end: int) -> None:
            assert torch.equal(buffer[HEADER_BYTES:end], expected[HEADER_BYTES:end])
            reported.append(end)

        stamper.pack(sources, views, buffer, 3, progress)
        assert torch.equal(buffer, expected)
        assert reported == sorted(reported) and len(reported) >= 2
        last = layout.entries[-1]
        assert reported[-1] == last.offset + last.nbytes
    finally:
        stamper.close()
        torch.set_num_threads(previous)


def test_a_back_half_that_fails_fails_the_pack() -> None:
    leaves = _leaves()
    layout = BufferLayout.from_tensors(leaves)
    sources = [leaves[e.name] for e in layout.entries]
    sources[-1] = sources[-1][:-1]  # the last leaf, in the back half, one element short
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    stamper = Stamper(layout, checksum=False)
    try:
        buffer = torch.zeros(layout.nbytes, dtype=torch.uint8)
        with pytest.raises(RuntimeError):
            stamper.pack(sources, layout.views(buffer), buffer, 1, lambda end: None)
    finally:
        stamper.close()
        torch.set_num_threads(previous)


def test_stamped_narrowed_leaves_equal_pack_then_hash() -> None:
    """A narrower wire dtype (float32 travelling as bfloat16) is split by elements."""
    source = torch.randn(3 * PIECE_BYTES // 2 + 5)
    other = torch.randn(PIECE_BYTES)
    wire = BufferLayout.from_tensors({"w": source.bfloat16(), "x": other})
    sources = [{"w": source, "x": other}[e.name] for e in wire.entries]
    stamper = Stamper(wire, checksum=True)
    try:
        buffer = torch.full((wire.nbytes,), 0x5A, dtype=torch.uint8)  # padding as below
        stamper.pack(sources, wire.views(buffer), buffer, 5)
        assert torch.equal(buffer, _reference(wire, sources, 5))
    finally:
        stamper.close()


@pytest.mark.parametrize("kind", [XXH3_64, CRC32])
def test_running_checksum_equals_one_shot(kind: int) -> None:
    data = torch.randint(0, 256, (1 << 20,), dtype=torch.uint8)
    running = Checksum(kind)
    for start in range(0, data.numel(), 300_001):
        running.update(host_bytes(data[start:start + 300_001]))
    assert running.value() == checksum(host_bytes(data), kind)


def test_corrupted_stamped_message_is_refused() -> None:
    leaves = {"w": torch.randn(3 * PIECE_BYTES // 4)}
    layout = BufferLayout.from_tensors(leaves)
    stamper = Stamper(layout, checksum=True)
    try:
        buffer = torch.empty(layout.nbytes, dtype=torch.uint8)
        stamper.pack([leaves["w"]], layout.views(buffer), buffer, 1)
    finally:
        stamper.close()
    buffer[HEADER_BYTES + PIECE_BYTES + 3] ^= 1
    with pytest.raises(IntegrityError, match="checksum"):
        check_payload(buffer, "test")
