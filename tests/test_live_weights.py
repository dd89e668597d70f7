"""What an apply updates, and what a send reads (issue 24's P4, "no silent non-apply").

The contract (``weight_sync.collector.policy_buffers``, ``weight_sync.wire.live``):

* a collector's ``nn.Module`` is updated in the tensors it holds at each apply, also
  ones replaced since construction (``load_state_dict(assign=True)``, a forward that
  rebinds a buffer); a TensorDict or ``state_dict`` is written in place, so the module
  whose ``state_dict()`` it is holds the new values, with or without ``wire_dtype``;
* the learner sends its module's tensors as they are at each send (replaced ones too);
* a policy on the meta device is refused at construction.

Sender and receiver in one process (threads, TCPStore port 0).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch
from tensordict import TensorDict

from weight_sync import WeightReceiver, WeightSender
from weight_sync.errors import InvalidWeightsError, LayoutMismatchError
from weight_sync.wire.layout import BufferLayout
from weight_sync.wire.live import LiveLeaves

pytestmark = pytest.mark.timeout(60)


class Counting(torch.nn.Module):
    """A policy whose forward rebinds a buffer (a common counter pattern)."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = torch.nn.Linear(4, 3)
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))
        self.register_buffer("scale", torch.ones(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls = self.calls + 1
        return self.net(x) * self.scale


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def narrowed(weights: dict[str, torch.Tensor], wire: str) -> dict[str, torch.Tensor]:
    """What a collector holds of ``weights`` sent with ``wire_dtype=wire``."""
    if not wire:
        return weights
    dtype = getattr(torch, wire)
    return {k: v.to(dtype).to(v.dtype) if v.dtype == torch.float32 else v
            for k, v in weights.items()}


@contextlib.contextmanager
def connected(policy: Any, collector_policy: Any, **options: Any
              ) -> Iterator[tuple[WeightSender, WeightReceiver]]:
    with WeightSender(policy, num_collectors=1, timeout=20, **options) as sender, \
            ThreadPoolExecutor(1) as pool:
        receiver = WeightReceiver(collector_policy, sender.connection_info, 0, timeout=20)
        joined = pool.submit(receiver.connect, 20)
        sender.connect(timeout=20)
        joined.result(timeout=20)
        try:
            yield sender, receiver
        finally:
            receiver.close()


def update(sender: WeightSender, receiver: WeightReceiver) -> int:
    version = sender.send_weights_async()
    assert receiver.receive_weights(timeout=20) == version
    sender.wait_ack(timeout=20)
    return version


def step(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for t in module.state_dict(keep_vars=True).values():
            t.add_(torch.ones_like(t))


# -- a collector built on a state_dict / TensorDict(state_dict()) ---------------------------
@pytest.mark.parametrize("wire", ["", "bfloat16"])
@pytest.mark.parametrize("form", ["state_dict", "tensordict"])
def test_collector_built_on_a_state_dict_updates_its_module(form: str, wire: str) -> None:
    learner, worker = Counting(0), Counting(1)
    weights = worker.state_dict()
    given = weights if form == "state_dict" else TensorDict(weights)
    with connected(learner, given, wire_dtype=wire) as (sender, receiver):
        for _ in range(3):
            step(learner)
            update(sender, receiver)
            assert_same(snapshot(worker), narrowed(snapshot(learner), wire))


# -- a collector's module whose tensors are replaced ---------------------------------------
def test_collector_module_rebinding_a_buffer_in_forward_stays_exact() -> None:
    learner, worker = Counting(0), Counting(1)
    with connected(learner, worker) as (sender, receiver):
        for _ in range(3):
            for _ in range(5):
                worker(torch.randn(2, 4))  # rebinds worker.calls each call
            learner.calls += 7
            step(learner)
            update(sender, receiver)
            assert_same(snapshot(worker), snapshot(learner))


@pytest.mark.parametrize("wire", ["", "bfloat16"])
def test_collector_module_loaded_with_assign_after_connect_stays_exact(wire: str) -> None:
    learner, worker = Counting(0), Counting(1)
    with connected(learner, worker, wire_dtype=wire) as (sender, receiver):
        worker.load_state_dict(Counting(2).state_dict(), assign=True)
        step(learner)
        update(sender, receiver)
        assert_same(snapshot(worker), narrowed(snapshot(learner), wire))


def test_collector_module_replaced_with_another_layout_is_refused() -> None:
    learner, worker = Counting(0), Counting(1)
    with connected(learner, worker) as (sender, receiver):
        worker.scale = torch.ones(5)
        sender.send_weights_async()
        with pytest.raises(LayoutMismatchError, match=r"(?s)replaced after construction.*scale"):
            receiver.receive_weights(timeout=20)


# -- a learner whose tensors are replaced ---------------------------------------------------
def test_learner_loading_a_checkpoint_with_assign_is_sent_and_followed() -> None:
    learner, worker = Counting(0), Counting(1)
    with connected(learner, worker) as (sender, receiver):
        learner.load_state_dict(Counting(3).state_dict(), assign=True)
        update(sender, receiver)
        assert_same(snapshot(worker), snapshot(learner))
        step(learner)  # in place, on the tensors loaded
        update(sender, receiver)
        assert_same(snapshot(worker), snapshot(learner))


def test_learner_rebinding_a_buffer_is_sent() -> None:
    learner, worker = Counting(0), Counting(1)
    with connected(learner, worker) as (sender, receiver):
        learner.scale = torch.full((3,), 2.5)
        learner(torch.randn(1, 4))  # rebinds learner.calls
        update(sender, receiver)
        assert_same(snapshot(worker), snapshot(learner))
        with torch.no_grad():
            learner.scale.mul_(3)
        update(sender, receiver)
        assert_same(snapshot(worker), snapshot(learner))


def test_learner_tensors_replaced_by_another_layout_refused_at_send() -> None:
    learner, worker = Counting(0), Counting(1)
    with connected(learner, worker) as (sender, _):
        learner.net = torch.nn.Linear(4, 5)
        with pytest.raises(LayoutMismatchError, match=r"(?s)WeightSender.*net.weight: shape"):
            sender.send_weights_async()


# -- meta-device policies -------------------------------------------------------------------
def test_meta_policies_refused_at_construction() -> None:
    meta = Counting(0).to("meta")
    with pytest.raises(InvalidWeightsError, match=r"WeightSender: weight .* meta device"):
        WeightSender(meta, num_collectors=1)
    with WeightSender(Counting(0), num_collectors=1) as sender, \
            pytest.raises(InvalidWeightsError, match=r"collector 0: weight .*meta device"):
        WeightReceiver(meta, sender.connection_info, 0)


# -- the cost of following a module ---------------------------------------------------------
def test_unchanged_module_is_not_read_again() -> None:
    """Nothing replaced: the same list of tensors, no re-read; a replacement is seen."""
    module = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(150)])
    live = LiveLeaves(module, BufferLayout.from_weights(module), "test")
    first = live.current()
    assert live.current() is first and len(first) == 300
    module[7].bias = torch.nn.Parameter(torch.zeros(8))
    again = live.current()
    assert again is not first and again[live_index(module, "7.bias")] is module[7].bias
    start = time.perf_counter()
    for _ in range(100):
        live.current()
    assert (time.perf_counter() - start) / 100 < 0.002  # a hang guard; ~20 µs measured


def live_index(module: torch.nn.Module, name: str) -> int:
    return sorted(dict(module.named_parameters())).index(name)


# -- torch.compile's wrapper: the same weights under `_orig_mod.` names ----------------------
@pytest.mark.parametrize("compiled_side", ["learner", "collector"])
def test_compiled_and_uncompiled_policies_sync_bit_exact(compiled_side: str) -> None:
    learner, worker = Counting(0), Counting(1)
    sent = torch.compile(learner) if compiled_side == "learner" else learner
    held = torch.compile(worker) if compiled_side == "collector" else worker
    with connected(sent, held) as (sender, receiver):
        assert_same(snapshot(worker), snapshot(learner))
        step(learner)
        update(sender, receiver)
        assert_same(snapshot(worker), snapshot(learner))
