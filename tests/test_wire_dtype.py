"""``wire_dtype``: float32 leaves travel narrowed (bfloat16 or float16) and are widened
on arrival, within the documented bound; every other leaf arrives bit-exact."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from weight_sync import ConnectionInfo, WeightReceiver, WeightSender
from weight_sync.errors import ConfigError

pytestmark = pytest.mark.timeout(120)

#: Relative rounding bound of each wire dtype (round to nearest: half an ulp).
BOUNDS = {"bfloat16": 2.0**-8, "float16": 2.0**-11}


def _weights(version: int, wire: str) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(version)
    # float16 ends at 65504: keep its magnitudes inside its normal range.
    scale = torch.tensor([1e-3, 1.0, 1e3]) if wire == "float16" else torch.tensor(
        [1e-30, 1.0, 1e30])
    mags = scale[torch.randint(0, 3, (4096,), generator=gen)]
    signs = torch.randint(0, 2, (4096,), generator=gen) * 2 - 1
    return {
        "f32": signs * (1 + torch.rand(4096, generator=gen)) * mags,  # normal numbers
        "f32_exact": torch.tensor([0.0, -0.0, 1.0, -2.0, 0.5]),  # representable: exact
        "f64": torch.randn(64, generator=gen, dtype=torch.float64),
        "bf16": torch.randn(64, generator=gen).bfloat16(),
        "i64": torch.randint(-(2**62), 2**62, (64,), generator=gen),
        "flag": torch.rand(64, generator=gen) > 0.5,
    }


def _blank(wire: str) -> dict[str, torch.Tensor]:
    return {k: torch.zeros_like(v) for k, v in _weights(0, wire).items()}


@pytest.mark.parametrize("transport", ["distributed", "shm"])
@pytest.mark.parametrize("wire", sorted(BOUNDS))
def test_floats_narrowed_within_bound_others_exact(wire: str, transport: str) -> None:
    weights = _weights(0, wire)
    policy = _blank(wire)
    with WeightSender(weights, 1, timeout=30, transport=transport, wire_dtype=wire) as sender, \
            ThreadPoolExecutor(1) as pool:
        assert sender.wire_layout.nbytes < 0.6 * sender.layout.nbytes  # float32 dominates
        rx = WeightReceiver(policy, sender.connection_info, 0, timeout=30)
        joined = pool.submit(rx.connect, 60)
        sender.connect(timeout=60)
        assert joined.result(60) == 0
        try:
            for version in range(4):
                if version:
                    for name, value in _weights(version, wire).items():
                        weights[name].copy_(value)
                    assert sender.send_weights_async() == version
                    assert rx.receive_weights(timeout=30) == version
                    sender.wait_ack(timeout=30)
                narrow = getattr(torch, wire)
                got, sent = policy["f32"], weights["f32"]
                assert got.dtype == torch.float32  # widened back on arrival
                assert torch.equal(got, sent.to(narrow).float())  # exactly the rounding
                assert bool(((got - sent).abs() <= BOUNDS[wire] * sent.abs()).all())
                assert torch.equal(policy["f32_exact"], weights["f32_exact"])
                for name in ("f64", "bf16", "i64", "flag"):
                    assert policy[name].dtype == weights[name].dtype
                    assert torch.equal(policy[name], weights[name]), name
        finally:
            rx.close()


def test_wire_dtype_is_validated() -> None:
    with pytest.raises(ConfigError, match=r"wire_dtype must be '' or one of .* got 'int8'"):
        WeightSender({"w": torch.zeros(3)}, 1, wire_dtype="int8")
    with pytest.raises(ConfigError, match=r"ConnectionInfo.wire_dtype .* got 'fp8'"):
        ConnectionInfo(host="127.0.0.1", port=1, name="p", num_collectors=1, wire_dtype="fp8")
