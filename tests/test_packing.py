"""Packing into one flat message, the header, applying, and the snapshot pool."""

from __future__ import annotations

import models
import pytest
import torch
from tensordict import TensorDict

from weight_sync.errors import InvalidWeightsError, ProtocolError
from weight_sync.wire.layout import HEADER_BYTES, BufferLayout, named_leaves
from weight_sync.wire.packing import MAGIC, copy_in, pack, read_header, swap_in, write_header
from weight_sync.wire.snapshots import SnapshotPool


def _message(layout: BufferLayout) -> torch.Tensor:
    # Garbage-filled, so a leaf that is not written shows up as a mismatch.
    return torch.full((layout.nbytes,), 0xA5, dtype=torch.uint8)


def test_pack_views_roundtrip_bit_exact(mixed_leaves: dict[str, torch.Tensor]) -> None:
    assert not mixed_leaves["f32_transposed"].is_contiguous()
    assert mixed_leaves["expanded"].stride()[0] == 0
    layout = BufferLayout.from_weights(mixed_leaves)
    buffer = _message(layout)
    sources = list(named_leaves(mixed_leaves).values())
    pack(sources, layout.views(buffer))
    for entry, view, source in zip(layout.entries, layout.views(buffer), sources, strict=True):
        assert view.dtype == source.dtype and view.shape == source.shape, entry.name
        assert models.leaf_bytes(view) == models.leaf_bytes(source), entry.name
        # The view aliases the message, exactly at the layout's offset.
        if entry.nbytes:
            assert view.data_ptr() == buffer.data_ptr() + entry.offset
        else:
            assert view.numel() == 0


def test_pack_handles_nan_and_negative_zero_bit_exactly() -> None:
    special = torch.tensor([float("nan"), -0.0, float("inf"), -float("inf"), 1e-45])
    leaves = {"a": special, "b": special.bfloat16(), "c": special.half()}
    layout = BufferLayout.from_weights(leaves)
    buffer = _message(layout)
    pack(list(leaves.values()), layout.views(buffer))
    for view, source in zip(layout.views(buffer), leaves.values(), strict=True):
        assert models.leaf_bytes(view) == models.leaf_bytes(source)


def test_pack_refuses_count_mismatch(mlp: torch.nn.Module) -> None:
    layout = BufferLayout.from_weights(mlp)
    views = layout.views(_message(layout))
    with pytest.raises(InvalidWeightsError, match=f"for a layout of {len(views)} entries"):
        pack(list(named_leaves(mlp).values())[:-1], views)


def test_header_roundtrip_and_no_overlap_with_first_leaf(mlp: torch.nn.Module) -> None:
    layout = BufferLayout.from_weights(mlp)
    buffer = _message(layout)
    sources = list(named_leaves(mlp).values())
    pack(sources, layout.views(buffer))
    write_header(buffer, layout, 41)
    assert read_header(buffer, layout) == 41
    assert buffer[:HEADER_BYTES].view(torch.int64)[0].item() == MAGIC
    # Stamping the header did not touch the weights.
    for view, source in zip(layout.views(buffer), sources, strict=True):
        assert models.leaf_bytes(view) == models.leaf_bytes(source)


def test_header_with_wrong_magic_is_a_protocol_error(mlp: torch.nn.Module) -> None:
    layout = BufferLayout.from_weights(mlp)
    buffer = _message(layout)
    write_header(buffer, layout, 3)
    buffer[0] ^= 0xFF
    with pytest.raises(ProtocolError, match="not a weight-sync message"):
        read_header(buffer, layout)
    with pytest.raises(ProtocolError):
        read_header(torch.zeros(layout.nbytes, dtype=torch.uint8), layout)


def test_header_for_another_layout_is_a_protocol_error() -> None:
    # Same size, different names: only the layout tag tells them apart.
    a = BufferLayout.from_weights({"x": torch.zeros(4)})
    b = BufferLayout.from_weights({"y": torch.zeros(4)})
    assert a.nbytes == b.nbytes and a.digest != b.digest
    buffer = _message(a)
    write_header(buffer, a, 1)
    with pytest.raises(ProtocolError, match="tag="):
        read_header(buffer, b)
    bigger = BufferLayout.from_weights({"x": torch.zeros(400)})
    with pytest.raises(ProtocolError, match=f"expected nbytes={bigger.nbytes}"):
        read_header(torch.cat([buffer, torch.zeros(bigger.nbytes - a.nbytes,
                                                   dtype=torch.uint8)]), bigger)


def test_swap_in_keeps_identity_and_points_at_message(mlp: torch.nn.Module) -> None:
    source = models.make_mlp(seed=5)
    layout = BufferLayout.from_weights(mlp)
    buffer = _message(layout)
    pack(list(named_leaves(source).values()), layout.views(buffer))
    targets = list(named_leaves(mlp).values())
    ids = [id(t) for t in targets]
    swap_in(targets, layout.views(buffer))
    assert [id(t) for t in named_leaves(mlp).values()] == ids
    assert models.fingerprint(mlp) == models.fingerprint(source)
    assert mlp[0].weight.requires_grad and isinstance(mlp[0].weight, torch.nn.Parameter)
    for entry, target in zip(layout.entries, targets, strict=True):
        if entry.nbytes:
            assert target.data_ptr() == buffer.data_ptr() + entry.offset
    # The module still runs on the swapped-in weights.
    mlp.eval()
    assert mlp(torch.ones(2, 8)).shape == (2, 4)


def test_copy_in_copies_without_aliasing(real_policy: TensorDict) -> None:
    source = models.make_real_policy(seed=3)
    layout = BufferLayout.from_weights(real_policy)
    buffer = _message(layout)
    pack(list(named_leaves(source).values()), layout.views(buffer))
    copy_in(list(named_leaves(real_policy).values()), layout.views(buffer))
    assert models.fingerprint(real_policy) == models.fingerprint(source)
    buffer.fill_(0)  # the policy holds its own copy
    assert models.fingerprint(real_policy) == models.fingerprint(source)


def test_snapshot_pool_packs_and_reuses(real_policy: TensorDict) -> None:
    layout = BufferLayout.from_weights(real_policy)
    pool = SnapshotPool(layout, torch.device("cpu"))
    sources = list(named_leaves(real_policy).values())
    expected = models.fingerprint(real_policy)

    snap = pool.take(sources, version=7)
    assert snap.version == 7 and read_header(snap.buffer, layout) == 7
    models.mutate(real_policy, 0)  # the learner steps: the snapshot must not change
    assert models.fingerprint(dict(zip(named_leaves(real_policy), snap.views,
                                       strict=True))) == expected
    first_buffer = snap.buffer.data_ptr()

    # Two holders (two links sending it): it is free only after both released.
    snap.retain()
    snap.release()
    assert pool.free == []
    snap.release()
    assert pool.free == [snap]

    again = pool.take(sources, version=8)
    assert again is snap and again.buffer.data_ptr() == first_buffer
    assert pool.allocated == 1 and again.version == 8 and read_header(again.buffer, layout) == 8
    # While one is held, the next take allocates a second buffer.
    other = pool.take(sources, version=9)
    assert other is not again and pool.allocated == 2
    other.release()
    again.release()
    assert sorted(map(id, pool.free)) == sorted([id(snap), id(other)])


def test_snapshot_over_release_is_an_error(mlp: torch.nn.Module) -> None:
    pool = SnapshotPool(BufferLayout.from_weights(mlp), torch.device("cpu"))
    snap = pool.take(list(named_leaves(mlp).values()), version=0)
    snap.release()
    with pytest.raises(RuntimeError, match="released more often than retained"):
        snap.release()
    assert pool.free.count(snap) == 1  # not returned twice
