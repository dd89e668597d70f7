"""Packing small messages with one ``torch.cat`` per run of leaves
(:class:`~weight_sync.wire.stamping.Gather`, used by the stamper): the very bytes a
leaf-by-leaf pack writes, padding included, and never stale sources."""

from __future__ import annotations

import pytest
import torch

from weight_sync.wire.layout import BufferLayout
from weight_sync.wire.packing import pack, write_header
from weight_sync.wire.stamping import Gather, Stamper, storage_key

pytestmark = pytest.mark.timeout(60)


def _leaves() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return {  # sorted by name, dtypes interleave: several runs, odd sizes: padding
        "a.weight": torch.randn(7, 5, generator=gen),
        "a.bias": torch.randn(7, generator=gen),
        "b.count": torch.tensor(11, dtype=torch.int64),
        "b.mask": torch.tensor([True, False, True]),
        "c.half": torch.randn(9, generator=gen).half(),
        "c.weight": torch.randn(3, 3, generator=gen),
        "d.empty": torch.zeros(0),
    }


def _packed(layout: BufferLayout, sources: list[torch.Tensor], gathered: bool
            ) -> torch.Tensor:
    buffer = torch.zeros(layout.nbytes, dtype=torch.uint8)  # as a pool's start
    if gathered:
        gather = Gather.build(layout, sources, buffer.device)
        assert gather is not None
        gather.into(buffer)
    else:
        pack(sources, layout.views(buffer))
    return buffer


def test_gather_writes_the_bytes_a_leaf_by_leaf_pack_writes() -> None:
    leaves = _leaves()
    layout = BufferLayout.from_tensors(leaves)
    sources = [leaves[e.name] for e in layout.entries]
    assert torch.equal(_packed(layout, sources, True), _packed(layout, sources, False))


def test_gather_declines_what_it_cannot_copy_as_is() -> None:
    leaves = _leaves()
    layout = BufferLayout.from_tensors(leaves)
    sources = [leaves[e.name] for e in layout.entries]
    cpu = torch.device("cpu")
    transposed = [s.t() if s.dim() == 2 and s.shape[0] != s.shape[1] else s
                  for s in sources]
    assert Gather.build(layout, transposed, cpu) is None  # not contiguous
    widened = [s.double() if s.dtype == torch.float32 else s for s in sources]
    assert Gather.build(layout, widened, cpu) is None  # converted on the way
    assert Gather.build(layout, sources[:-1], cpu) is None


def test_stamper_follows_a_source_whose_storage_changed() -> None:
    """``param.data = ...`` between two sends: the second message carries the new
    tensor's values, not the old storage's."""
    module = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Linear(4, 2))
    leaves = dict(module.named_parameters())
    layout = BufferLayout.from_tensors(leaves)
    sources = [leaves[e.name] for e in layout.entries]
    stamper = Stamper(layout, checksum=True)
    buffer = torch.zeros(layout.nbytes, dtype=torch.uint8)
    views = layout.views(buffer)
    stamper.pack(sources, views, buffer, 1)
    assert all(torch.equal(v, s) for v, s in zip(views, sources, strict=True))
    before = storage_key(sources)
    with torch.no_grad():
        module[0].weight.data = torch.full_like(module[0].weight, 2.5)
        module[1].bias.add_(1.0)  # in place: same storage
    assert storage_key(sources) != before
    stamper.pack(sources, views, buffer, 2)
    assert torch.equal(views[[e.name for e in layout.entries].index("0.weight")],
                       torch.full((4, 6), 2.5))
    assert all(torch.equal(v, s) for v, s in zip(views, sources, strict=True))
    expected = torch.zeros_like(buffer)
    pack(sources, layout.views(expected))
    write_header(expected, layout, 2, checksum=True)
    assert torch.equal(buffer, expected)
