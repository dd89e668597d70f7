"""``changed_only``: a collector is sent only the leaves whose bytes changed since the
version it holds, and still ends up bit-exact to the learner's version: after random
subsets of leaves change (none and all included), with collectors holding different
versions, combined with ``wire_dtype``, after a corrupted delta, and after a collector
is killed and restarted (a whole message, then deltas again)."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import random
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import pytest
import torch
from harness import Cluster
from versioned import MARGIN_S, RX_TIMEOUT_S

from weight_sync import (
    CollectorFailed,
    ConnectionInfo,
    WeightReceiver,
    WeightSender,
    WeightSyncError,
)
from weight_sync.collector.hooks import ReceiverHooks
from weight_sync.errors import ConfigError, ProtocolError
from weight_sync.wire.delta import DeltaSpec, spans
from weight_sync.wire.layout import HEADER_BYTES

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the test bed is used from the checkout, not installed
    sys.path.insert(0, str(ROOT))

import testbed  # noqa: E402

pytestmark = pytest.mark.timeout(120)


def _policy(seed: int) -> dict[str, torch.Tensor]:
    """Leaves of every kind a policy has: float32, bfloat16, float64, int64, bool, a
    scalar, an empty one."""
    gen = torch.Generator().manual_seed(seed)
    return {
        "enc.w": torch.randn(64, 33, generator=gen),
        "enc.b": torch.randn(33, generator=gen),
        "head.w": torch.randn(17, 5, generator=gen),
        "head.b": torch.randn(5, generator=gen),
        "bn.mean": torch.randn(8, generator=gen, dtype=torch.float64),
        "bn.count": torch.tensor(3, dtype=torch.int64),
        "emb": torch.randn(11, 3, generator=gen).bfloat16(),
        "mask": torch.rand(9, generator=gen) > 0.5,
        "scalar": torch.tensor(1.5),
        "empty": torch.zeros(0),
    }


@torch.no_grad()
def _change(weights: dict[str, torch.Tensor], names: list[str], rng: random.Random) -> None:
    for name in names:
        t = weights[name]
        if t.dtype == torch.bool:
            t.logical_not_()
        elif t.dtype == torch.int64:
            t.add_(rng.randint(1, 9))
        else:
            t.add_(torch.full_like(t, 1.0 + rng.random()))


def _bit_exact(policy: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> bool:
    return all(policy[k].dtype == want[k].dtype and torch.equal(policy[k], want[k])
               for k in want)


def _narrowed(weights: dict[str, torch.Tensor], wire: str) -> dict[str, torch.Tensor]:
    """What a collector holds with ``wire_dtype=wire``: float32 leaves rounded to it."""
    if not wire:
        return weights
    return {k: v.to(getattr(torch, wire)).float() if v.dtype == torch.float32 else v
            for k, v in weights.items()}


@contextlib.contextmanager
def _connected(weights: dict[str, torch.Tensor], n: int, *, hooks: ReceiverHooks | None = None,
               secret: str = "", **sender_kw: Any
               ) -> Iterator[tuple[WeightSender, list[WeightReceiver],
                                   list[dict[str, torch.Tensor]]]]:
    """A changed-only sender and ``n`` receivers (threads) at version 0; all closed."""
    policies = [{k: torch.zeros_like(v) for k, v in weights.items()} for _ in range(n)]
    with WeightSender(weights, n, timeout=RX_TIMEOUT_S, changed_only=True, secret=secret,
                      **sender_kw) as sender, ThreadPoolExecutor(n) as pool:
        rxs = [WeightReceiver(p, sender.connection_info, i, timeout=RX_TIMEOUT_S,
                              hooks=hooks, secret=secret) for i, p in enumerate(policies)]
        try:
            joined = [pool.submit(rx.connect, 60) for rx in rxs]
            sender.connect(timeout=60)
            assert [j.result(60) for j in joined] == [0] * n
            yield sender, rxs, policies
        finally:
            for rx in rxs:
                rx.close()


def _catch_up(sender: WeightSender, rx: WeightReceiver, policy: dict[str, torch.Tensor],
              history: dict[int, dict[str, torch.Tensor]]) -> list[int]:
    """Let a collector that has not polled apply versions up to the newest (the learner
    in ``wait_ack`` meanwhile); every version it applies checked bit-exact."""
    applied: list[int] = []

    def drain() -> None:
        while rx.version < sender.version:
            got = rx.receive_weights(timeout=RX_TIMEOUT_S)
            assert got is not None
            assert _bit_exact(policy, history[got]), f"version {got} not bit-exact"
            applied.append(got)

    with ThreadPoolExecutor(1) as pool:
        done = pool.submit(drain)
        sender.wait_ack(timeout=RX_TIMEOUT_S + MARGIN_S)
        done.result(RX_TIMEOUT_S + MARGIN_S)
    return applied


def test_random_subsets_bit_exact_with_a_slow_collector() -> None:
    rng = random.Random(13)
    weights = _policy(0)
    names = sorted(weights)
    history = {0: {k: v.clone() for k, v in weights.items()}}
    seen: list[tuple[str, int, int]] = []  # (listener thread, version, bytes to receive)
    hooks = ReceiverHooks(before_receive=lambda v, buf: seen.append(
        (threading.current_thread().name, v, -1 if buf is None else buf.numel())))
    with _connected(weights, 2, hooks=hooks) as (sender, (fast, slow), (p_fast, p_slow)):
        assert _bit_exact(p_fast, history[0]) and _bit_exact(p_slow, history[0])
        slow_applied = []
        for version in range(1, 31):
            if version == 1:
                subset: list[str] = []  # nothing changed
            elif version == 2:
                subset = names  # everything changed
            else:  # mostly among six leaves, the other four rarely change
                pool = names if rng.random() < 0.2 else names[:6]
                subset = rng.sample(pool, rng.randint(0, len(pool)))
            _change(weights, subset, rng)
            history[version] = {k: v.clone() for k, v in weights.items()}
            assert sender.send_weights_async() == version
            # the fast collector applies every version; the slow one polls every 4th
            # only, so it holds an older version than the fast one and gets deltas
            # against it (or the newest pending version whole)
            assert fast.receive_weights(timeout=RX_TIMEOUT_S) == version
            assert _bit_exact(p_fast, history[version]), f"version {version} not bit-exact"
            if version % 4 == 0:
                slow_applied += _catch_up(sender, slow, p_slow, history)
        slow_applied += _catch_up(sender, slow, p_slow, history)
        assert slow.version == fast.version == 30
        assert _bit_exact(p_slow, history[30]) and _bit_exact(p_fast, history[30])
        assert len(slow_applied) < 30  # it skipped versions: not a lock-step twin
        # the slow collector got changes against versions the fast one no longer held
        full = sender.wire_layout.nbytes
        slow_rx = [(v, n) for name, v, n in seen if name.endswith("-1")]
        assert any(n < full and v - held > 1
                   for (held, _), (v, n) in itertools.pairwise(slow_rx)), slow_rx
        stats = sender.stats
        assert stats.changed_only_sent > 0
        assert stats.bytes_sent < stats.messages_sent * sender.wire_layout.nbytes


def test_unchanged_leaves_are_not_sent() -> None:
    """A frozen encoder and a trained head: each version moves the head's bytes (and the
    header) only, as counted by the learner and seen by the collector's transport."""
    weights = {"encoder": torch.randn(4096, 64), "head": torch.randn(64, 4),
               "steps": torch.tensor(0, dtype=torch.int64)}
    received: list[tuple[int, int]] = []  # (version, bytes the transport was to fill)
    hooks = ReceiverHooks(before_receive=lambda v, buf: received.append(
        (v, -1 if buf is None else buf.numel())))
    with _connected(weights, 1, hooks=hooks) as (sender, (rx,), (policy,)):
        layout = sender.wire_layout
        tiles = dict(zip([e.name for e in layout.entries], spans(layout), strict=True))
        head_and_steps = sum(tiles[k][1] - tiles[k][0] for k in ("head", "steps"))
        full = layout.nbytes
        assert full > 100 * head_and_steps  # the encoder is most of the message
        assert sender.stats.bytes_sent == full  # the initial sync: whole
        for version in range(1, 6):
            before = sender.stats.bytes_sent
            with torch.no_grad():
                weights["head"].add_(1.0)
                weights["steps"].add_(1)
            sender.send_weights_async()
            assert rx.receive_weights(timeout=RX_TIMEOUT_S) == version
            sender.wait_ack(timeout=RX_TIMEOUT_S)
            assert sender.stats.bytes_sent - before == HEADER_BYTES + head_and_steps
            assert _bit_exact(policy, weights)
        # nothing changed: the header alone
        before = sender.stats.bytes_sent
        sender.send_weights_async()
        assert rx.receive_weights(timeout=RX_TIMEOUT_S) == 6
        sender.wait_ack(timeout=RX_TIMEOUT_S)
        assert sender.stats.bytes_sent - before == HEADER_BYTES
        assert _bit_exact(policy, weights)
        assert received == [(0, full), *[(v, HEADER_BYTES + head_and_steps)
                                         for v in range(1, 6)], (6, HEADER_BYTES)]
        assert sender.stats.changed_only_sent == 6


@pytest.mark.parametrize("wire", ["bfloat16", "float16"])
def test_with_wire_dtype_compares_the_narrowed_bytes(wire: str) -> None:
    weights = {"frozen": torch.randn(512), "head": torch.randn(256),
               "tiny": torch.full((64,), 1.0), "ids": torch.arange(16)}
    narrow = getattr(torch, wire)
    with _connected(weights, 1, wire_dtype=wire) as (sender, (rx,), (policy,)):
        layout = sender.wire_layout
        tiles = dict(zip([e.name for e in layout.entries], spans(layout), strict=True))
        for version in range(1, 4):
            before = sender.stats.bytes_sent
            with torch.no_grad():
                weights["head"].mul_(1.5)
                # below the wire dtype's resolution at 1.0: the same narrowed bytes
                weights["tiny"].add_(2.0**-14)
            sender.send_weights_async()
            assert rx.receive_weights(timeout=RX_TIMEOUT_S) == version
            sender.wait_ack(timeout=RX_TIMEOUT_S)
            assert sender.stats.bytes_sent - before == (
                HEADER_BYTES + tiles["head"][1] - tiles["head"][0])
            for name in ("frozen", "head", "tiny"):  # exactly a whole narrowed message
                assert torch.equal(policy[name], weights[name].to(narrow).float()), name
            assert torch.equal(policy["ids"], weights["ids"])
            assert policy["head"].dtype == torch.float32


class _FlipDeltas:
    """An ``after_receive`` hook that flips one bit of the first composed message of
    each version >= 1 (what is checked before apply)."""

    def __init__(self) -> None:
        self.flipped: set[int] = set()
        self.lock = threading.Lock()

    def __call__(self, version: int, message: torch.Tensor) -> None:
        with self.lock:
            if version < 1 or version in self.flipped:
                return
            self.flipped.add(version)
        message[message.numel() - 1 - version] ^= 1


@pytest.mark.parametrize(("secret", "wire"), [("", ""), ("s3cret", ""), ("", "bfloat16")],
                         ids=["checksum", "secret", "bfloat16"])
def test_corrupted_delta_refused_then_sent_whole(secret: str, wire: str) -> None:
    """Also with a wire dtype, where the collector composes in place (in the buffer it
    copies its policy from): the refused result is overwritten by the whole resend."""
    weights = _policy(1)
    flip = _FlipDeltas()
    with _connected(weights, 1, hooks=ReceiverHooks(after_receive=flip), secret=secret,
                    wire_dtype=wire) as (sender, (rx,), (policy,)):
        full = sender.wire_layout.nbytes
        for version in (1, 2):
            _change(weights, ["head.w"], random.Random(version))
            messages, deltas = sender.stats.messages_sent, sender.stats.changed_only_sent
            sender.send_weights_async()
            with ThreadPoolExecutor(1) as pool:  # wait_ack's slices read the resend
                acked = pool.submit(sender.wait_ack, 60)
                assert rx.receive_weights(timeout=60) == version
                acked.result(60)
            assert _bit_exact(policy, _narrowed(weights, wire))
            # a delta (refused), then the same version whole
            assert sender.stats.messages_sent == messages + 2
            assert sender.stats.changed_only_sent == deltas + 1
        assert rx.refused == 2 and flip.flipped == {1, 2}
        assert sender.stats.bytes_sent > 3 * full  # initial + two resends, whole


def test_changed_only_refused_where_it_cannot_work() -> None:
    weights = {"w": torch.zeros(8)}
    for transport in ("shm", "relay"):
        with pytest.raises(ConfigError, match=rf"changed_only .* transport '{transport}'"):
            WeightSender(weights, 1, transport=transport, changed_only=True)
    with pytest.raises(ConfigError, match=r"changed_only needs backend 'gloo'.*'nccl'"):
        WeightSender(weights, 1, backend="nccl", changed_only=True)
    with pytest.raises(ConfigError, match=r"changed_only must be a bool, got 'yes'"):
        WeightSender(weights, 1, changed_only="yes")


def test_delta_spec_round_trip_and_malformed() -> None:
    spec = DeltaSpec(41, (0, 3, 64, 299))
    assert DeltaSpec.decode(spec.encode(), 300) == spec
    assert DeltaSpec.decode(DeltaSpec(7, ()).encode(), 3) == DeltaSpec(7, ())
    with pytest.raises(ProtocolError, match="beyond the layout's 64"):
        DeltaSpec.decode(spec.encode(), 64)
    with pytest.raises(ProtocolError, match="malformed"):
        DeltaSpec.decode("x:zz", 3)


# -- a collector killed and restarted (processes) ---------------------------------------
def frozen_half(version: int) -> dict[str, torch.Tensor]:
    """A policy whose encoder never changes and whose head is a function of the version."""
    i = torch.arange(4096, dtype=torch.float32)
    return {"encoder": (i / 3).reshape(64, 64),
            "head": ((i[:256] + version * 5) % 97).reshape(16, 16),
            "steps": torch.tensor(version, dtype=torch.int64)}


def _fingerprint(weights: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(weights):
        digest.update(weights[name].contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def frozen_collector(info: ConnectionInfo, cid: int, out: Connection,
                     cmds: Connection) -> None:
    """Connect, then report every apply with a fingerprint until told to stop."""
    weights = {k: torch.zeros_like(v) for k, v in frozen_half(0).items()}
    with WeightReceiver(weights, info, cid, timeout=RX_TIMEOUT_S) as rx:
        try:
            version = rx.connect(timeout=60)
            out.send(("applied", cid, version, _fingerprint(weights), os.getpid()))
            while not cmds.poll(0):
                got = rx.receive_weights(timeout=0.05)
                if got is not None:
                    out.send(("applied", cid, got, _fingerprint(weights), os.getpid()))
        except WeightSyncError as exc:
            out.send(("error", cid, type(exc).__name__, str(exc), os.getpid()))
    out.send(("exit", cid, None, None, os.getpid()))


def test_rejoined_collector_gets_a_whole_message_then_deltas(cluster: Cluster) -> None:
    weights = frozen_half(0)
    with WeightSender(weights, 2, timeout=RX_TIMEOUT_S, changed_only=True) as sender:
        for cid in (0, 1):
            cluster.start(sender.connection_info, cid, frozen_collector)
        sender.connect(timeout=60)
        full = sender.wire_layout.nbytes

        def publish() -> tuple[int, int]:
            """The next version; the bytes and the changed-only messages it sent."""
            bytes0, deltas0 = sender.stats.bytes_sent, sender.stats.changed_only_sent
            for name, value in frozen_half(sender.version + 1).items():
                weights[name].copy_(value)
            sender.send_weights_async()
            sender.wait_ack(timeout=RX_TIMEOUT_S)
            return (sender.stats.bytes_sent - bytes0,
                    sender.stats.changed_only_sent - deltas0)

        sent, deltas = publish()
        assert deltas == 2 and sent < full // 4  # head and steps only, to both
        one_delta = sent // 2
        cluster.kill(0)
        for name, value in frozen_half(sender.version + 1).items():
            weights[name].copy_(value)
        sender.send_weights_async()
        with pytest.raises(CollectorFailed) as err:
            sender.wait_ack(timeout=RX_TIMEOUT_S)
        assert err.value.collector_id == 0
        cluster.start(sender.connection_info, 0, frozen_collector)
        bytes0, deltas0 = sender.stats.bytes_sent, sender.stats.changed_only_sent
        sender.wait_for([0], timeout=60)
        # the restarted collector holds nothing the learner knows of: a whole message
        assert sender.stats.bytes_sent - bytes0 == full
        assert sender.stats.changed_only_sent == deltas0
        assert cluster.applied(0, sender.version)[3] == _fingerprint(weights)
        for _ in range(2):  # then deltas again, to both
            assert publish() == (2 * one_delta, 2)
            for cid in (0, 1):
                msg = cluster.applied(cid, sender.version)
                assert msg[2] == sender.version and msg[3] == _fingerprint(weights)
        for cid in (0, 1):
            cluster.cmds[cid].send("stop")


# -- the wire-format benchmark on the test bed (slow) -----------------------------------
_BED = testbed.available()


@pytest.mark.skipif(_BED is not None, reason=f"no test bed here: {_BED}")
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_wire_format_benchmark_checks_weights_and_bytes(tmp_path: Path) -> None:
    """``python -m benchmarks.wire_formats --quick``: every format bit-exact (bfloat16:
    exactly the rounding), and the bytes each puts on the wire per round (no timing
    asserted): half with bfloat16, the head's half with changed-only, a quarter with both."""
    done = subprocess.run([sys.executable, "-m", "benchmarks.wire_formats", "--quick",
                           "--results-dir", str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=540)
    assert done.returncode == 0, done.stderr[-3000:]
    [result] = tmp_path.glob("wire_formats-*.json")
    series = json.loads(result.read_text())["series"]
    assert all(s["correct"] for s in series.values()), series
    full = series["fp32"]["bytes_median"]
    assert full == series["fp32"]["full_nbytes"]
    for name, share in (("bf16", 0.5), ("changed_only", 0.5), ("bf16_changed_only", 0.25)):
        assert abs(series[name]["bytes_median"] / full - share) < 0.01, (name, series[name])
