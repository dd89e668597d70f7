"""BufferLayout: leaves from every weights container, digests, differences, refusals."""

from __future__ import annotations

import json

import models
import pytest
import torch
from tensordict import NonTensorData, TensorDict

from weight_sync.errors import InvalidWeightsError, LayoutMismatchError
from weight_sync.wire.layout import HEADER_BYTES, BufferLayout, named_leaves


def test_module_state_dict_and_tensordict_agree(mlp: torch.nn.Module) -> None:
    from_module = BufferLayout.from_weights(mlp)
    from_state = BufferLayout.from_weights(mlp.state_dict())
    from_td = BufferLayout.from_weights(TensorDict.from_module(mlp))
    assert from_module == from_state == from_td
    assert [e.name for e in from_module.entries] == sorted(mlp.state_dict())
    assert from_module.digest == from_td.digest


def test_module_leaves_are_live_objects_and_sorted(mlp: torch.nn.Module) -> None:
    leaves = named_leaves(mlp)
    assert list(leaves) == sorted(leaves)
    assert leaves["0.weight"] is mlp[0].weight
    assert leaves["1.num_batches_tracked"] is mlp[1].num_batches_tracked
    assert leaves["1.num_batches_tracked"].dtype == torch.int64


def test_tied_parameters_count_once() -> None:
    a, b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    b.weight = a.weight
    model = torch.nn.Sequential(a, b)
    names = list(named_leaves(model))
    assert names.count("0.weight") == 1 and "1.weight" not in names
    assert len(names) == 3


def test_nested_tensordict_keys_are_dotted(real_policy: TensorDict) -> None:
    layout = BufferLayout.from_weights(real_policy)
    names = [e.name for e in layout.entries]
    assert len(names) == len(set(names)) == models.REAL_BLOCKS * 12 + 1
    assert "encoder.block07.norm.num_batches_tracked" in names
    dtypes = {e.dtype for e in layout.entries}
    assert dtypes == {torch.float32, torch.bfloat16, torch.int64}


def test_entries_aligned_disjoint_and_sized(mixed_leaves: dict[str, torch.Tensor]) -> None:
    layout = BufferLayout.from_weights(mixed_leaves)
    end = HEADER_BYTES
    for entry in layout.entries:
        tensor = mixed_leaves[entry.name]
        assert entry.offset % 64 == 0, entry
        assert entry.offset >= end, f"{entry.name} overlaps the previous leaf"
        assert entry.nbytes == tensor.numel() * tensor.element_size()
        assert entry.shape == tuple(tensor.shape) and entry.dtype == tensor.dtype
        end = entry.offset + entry.nbytes
    assert end <= layout.nbytes and layout.nbytes % 64 == 0


def test_digest_equal_for_equal_layouts_regardless_of_values() -> None:
    a, b = models.make_real_policy(seed=1), models.make_real_policy(seed=2)
    assert models.fingerprint(a) != models.fingerprint(b)
    assert BufferLayout.from_weights(a).digest == BufferLayout.from_weights(b).digest
    # Insertion order does not matter either: leaves are sorted by name.
    sd = models.make_mlp().state_dict()
    reversed_sd = dict(reversed(list(sd.items())))
    assert BufferLayout.from_weights(sd).digest == BufferLayout.from_weights(reversed_sd).digest


@pytest.mark.parametrize(
    "change",
    [
        lambda sd: sd.update({"0.weight": sd["0.weight"].double()}),       # dtype
        lambda sd: sd.update({"0.weight": sd["0.weight"].t()}),            # shape
        lambda sd: sd.update({"extra": torch.zeros(1)}),                   # extra leaf
        lambda sd: sd.pop("1.num_batches_tracked"),                        # missing leaf
        lambda sd: sd.update({"3.bias": sd.pop("3.bias").reshape(1, -1)}),  # rank only
    ],
    ids=["dtype", "shape", "extra", "missing", "rank"],
)
def test_digest_differs_on_any_change(change) -> None:  # type: ignore[no-untyped-def]
    sd = dict(models.make_mlp().state_dict())
    before = BufferLayout.from_weights(sd).digest
    change(sd)
    assert BufferLayout.from_weights(sd).digest != before


def _collector_and_learner() -> tuple[BufferLayout, BufferLayout]:
    learner = dict(models.make_mlp().state_dict())
    collector = dict(learner)
    collector["0.weight"] = collector["0.weight"].bfloat16()          # dtype
    collector["3.weight"] = torch.zeros(5, 32)                         # shape
    collector["1.bias"] = torch.zeros(33, dtype=torch.float64)        # shape and dtype
    del collector["1.num_batches_tracked"]                             # missing
    collector["extra.buffer"] = torch.zeros(2)                         # extra
    return BufferLayout.from_weights(collector), BufferLayout.from_weights(learner)


def test_differences_lists_every_kind() -> None:
    collector, learner = _collector_and_learner()
    diffs = collector.differences(learner.to_json())
    assert diffs == [
        "extra.buffer: only on the collector",
        "1.num_batches_tracked: missing on the collector (the learner has it)",
        "0.weight: dtype bfloat16 on the collector, float32 on the learner",
        "1.bias: shape (33,) on the collector, (32,) on the learner",
        "1.bias: dtype float64 on the collector, float32 on the learner",
        "3.weight: shape (5, 32) on the collector, (4, 32) on the learner",
    ]
    assert learner.differences(learner.to_json()) == []


def test_check_compatible_raises_with_differences() -> None:
    collector, learner = _collector_and_learner()
    learner.check_compatible(learner.to_json(), who="me")  # same layout: no error
    with pytest.raises(LayoutMismatchError) as info:
        collector.check_compatible(learner.to_json(), who="collector 3")
    err = info.value
    assert str(err).startswith("collector 3: weights differ from the learner's in 6 place(s)")
    assert len(err.differences) == 6
    assert all(line in str(err) for line in err.differences)


def test_check_compatible_truncates_long_lists() -> None:
    small = BufferLayout.from_weights({f"w{i:03d}": torch.zeros(1) for i in range(120)})
    other = BufferLayout.from_weights({"other": torch.zeros(1)})
    with pytest.raises(LayoutMismatchError) as info:
        small.check_compatible(other.to_json(), who="c")
    assert len(info.value.differences) == 121
    assert "... and 71 more" in str(info.value)


def test_to_json_roundtrips_describe(real_policy: TensorDict) -> None:
    layout = BufferLayout.from_weights(real_policy)
    assert json.loads(layout.to_json()) == layout.describe()
    assert all(isinstance(d, str) and not d.startswith("torch.")
               for _, _, d in layout.describe())


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.parametrize(
    ("weights", "match"),
    [
        ({}, "empty"),
        (TensorDict({}, batch_size=[]), "empty"),
        (torch.nn.ReLU(), "empty"),
        ({"w": [1.0, 2.0]}, "'w'.*not a tensor"),
        ({"w": torch.eye(3).to_sparse()}, "'w'.*only dense"),
        (lambda: {"w": torch.eye(3).to_sparse_csr()}, "'w'.*only dense"),
        (torch.zeros(3), "must be an nn.Module, a TensorDict or a state_dict"),
        ([torch.zeros(3)], "must be an nn.Module, a TensorDict or a state_dict"),
    ],
    ids=["empty-dict", "empty-td", "module-without-weights", "list-value", "sparse-coo",
         "sparse-csr", "bare-tensor", "list"],
)
def test_refuses_unsyncable_weights(weights: object, match: str) -> None:
    if callable(weights) and not isinstance(weights, torch.nn.Module):
        weights = weights()  # built here, so its beta warning is filtered
    with pytest.raises(InvalidWeightsError, match=match):
        BufferLayout.from_weights(weights)


def test_refuses_non_tensor_leaf_in_tensordict() -> None:
    td = TensorDict({"w": torch.zeros(2), "meta": NonTensorData("hello")}, batch_size=[])
    with pytest.raises(InvalidWeightsError, match="'meta'"):
        BufferLayout.from_weights(td)


def test_views_refuse_wrong_buffer(mlp: torch.nn.Module) -> None:
    layout = BufferLayout.from_weights(mlp)
    with pytest.raises(InvalidWeightsError, match=f"uint8 of {layout.nbytes} bytes"):
        layout.views(torch.empty(layout.nbytes - 1, dtype=torch.uint8))
    with pytest.raises(InvalidWeightsError, match=r"got torch\.float32"):
        layout.views(torch.empty(layout.nbytes, dtype=torch.float32))
