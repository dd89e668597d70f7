"""The learner in the test process, 1-4 collector processes on gloo (spawn).

Each spawn is reused for many versions and checks; collectors report exact
fingerprints (SHA-256 of every leaf's bytes) per version, compared with the learner's
record of what it snapshotted. Every wait is bounded; no sleep synchronises anything.
"""

from __future__ import annotations

import time
from typing import Any

import harness
import models
import pytest
import torch

from weight_sync import WeightReceiver, WeightSender, WeightSyncTimeout
from weight_sync.errors import ClosedError, LayoutMismatchError
from weight_sync.wire.layout import named_leaves

# A poll must return at once; this bound only guards against a hang.
POLL_BOUND_S = 1.0


# -- collector processes ----------------------------------------------------------------


def recording_collector(info: Any, cid: int, policy: str, seed: int, quiet_at: int,
                        out: Any) -> dict[str, Any]:
    """Apply every version it gets, recording its fingerprint; probe polls at ``quiet_at``.

    At version ``quiet_at`` the learner sends nothing until every collector reported
    (on its pipe ``out``) that its polls returned None promptly.
    """
    weights = models.build(policy, seed)
    before = models.fingerprint(weights)
    ids = [id(t) for t in named_leaves(weights).values()]
    receiver = WeightReceiver(weights, info, cid, timeout=30)
    first = receiver.connect(timeout=60)
    seen = {first: models.fingerprint(weights)}
    max_poll_s = 0.0
    end = "no end"
    while True:
        try:  # the learner's close ends the stream: ClosedError from a poll or a wait
            start = time.monotonic()
            version = receiver.receive_weights(timeout=0)
            max_poll_s = max(max_poll_s, time.monotonic() - start)
            if version is None:
                version = receiver.receive_weights(timeout=30)
        except ClosedError as exc:
            end = type(exc).__name__
            break
        if version is None:
            continue
        seen[version] = models.fingerprint(weights)
        if version == quiet_at:
            nones, slowest = 0, 0.0
            for _ in range(100):
                start = time.monotonic()
                nones += receiver.receive_weights(timeout=0) is None
                slowest = max(slowest, time.monotonic() - start)
            start = time.monotonic()
            bounded = receiver.receive_weights(timeout=0.2)
            out.send((cid, nones, slowest, bounded, time.monotonic() - start))
    same_objects = ids == [id(t) for t in named_leaves(weights).values()]
    receiver.close()
    return {"before": before, "first": first, "seen": seen, "max_poll_s": max_poll_s,
            "end": end, "same_objects": same_objects, "version": receiver.version}


def commanded_collector(info: Any, cid: int, ctl: Any, out: Any) -> dict[str, Any]:
    """Receives only when told on ``ctl``: ``("drain", v)`` polls until it applied ``v``;
    reports on ``out``."""
    weights = models.make_mlp(seed=50 + cid)
    receiver = WeightReceiver(weights, info, cid, timeout=30)
    out.send(("connected", cid, receiver.connect(timeout=60)))
    while True:
        command = harness.recv(ctl, 90, "a command")
        if command[0] == "end":
            break
        got: list[tuple[int, str]] = []
        while (not got or got[-1][0] < command[1]) and len(got) < 10:
            version = receiver.receive_weights(timeout=30)
            assert version is not None, f"no version after {got}"
            got.append((version, models.fingerprint(weights)))
        out.send(("drained", cid, got))
    errors = {}
    try:
        receiver.receive_weights(timeout=30)
    except Exception as exc:  # what the learner's close looks like here
        errors["stream_end"] = type(exc).__name__
    receiver.close()
    receiver.close()  # idempotent
    for name, call in (("poll_after_close", lambda: receiver.receive_weights(0)),
                       ("connect_after_close", lambda: receiver.connect(1))):
        try:
            call()
        except Exception as exc:
            errors[name] = type(exc).__name__
    return errors


def mismatched_collector(info: Any, cid: int) -> dict[str, Any]:
    """A collector whose policy differs from the learner's MLP in several ways."""
    weights = torch.nn.Sequential(
        torch.nn.Linear(8, 32), torch.nn.BatchNorm1d(32, track_running_stats=False),
        torch.nn.ReLU(), torch.nn.Linear(32, 5))
    weights[0].to(torch.bfloat16)
    weights.register_buffer("extra", torch.zeros(2))
    before = models.fingerprint(weights)
    receiver = WeightReceiver(weights, info, cid, timeout=30)
    try:
        receiver.connect(timeout=60)
    except LayoutMismatchError as exc:
        return {"message": str(exc), "differences": exc.differences,
                "untouched": models.fingerprint(weights) == before}
    return {"message": "connected", "differences": [], "untouched": False}


# -- tests ----------------------------------------------------------------------------


@pytest.mark.timeout(180)
@pytest.mark.parametrize("transport", ["distributed", "shm"])
def test_four_collectors_every_version_bit_exact_with_snapshots(transport: str) -> None:
    """N=4, nested TensorDict of ~300 float32/bfloat16/int64 leaves, over gloo sends or
    shared memory.

    Checks initial sync, bit-exactness of every version each collector applied, the
    snapshot property (the learner mutates its weights right after each send, before
    the ack), that every waited-for version reached everyone, polls never block, and
    the policy's tensor objects keep their identity.
    """
    n, versions = 4, 16
    policy = models.make_real_policy(seed=0)
    pipes = [harness.pipe() for _ in range(n)]  # (reader, writer): one per collector
    expected: dict[int, str] = {}
    waited: list[int] = [0]
    with WeightSender(policy, num_collectors=n, timeout=30, transport=transport) as sender:
        info = sender.connection_info
        targets = [(recording_collector, (info, c, "real", 100 + c, versions, pipes[c][1]))
                   for c in range(n)]
        with harness.spawn_collectors(targets, timeout=90) as children:
            sender.connect(timeout=90)
            assert set(sender.transports.values()) == {transport}
            expected[0] = models.fingerprint(policy)
            for step in range(1, versions + 1):
                models.mutate(policy, step)
                version = sender.send_weights_async()
                assert version == step == sender.version
                expected[version] = models.fingerprint(policy)
                models.mutate(policy, 1000 + step)  # the optimizer steps: must not leak
                if step % 5 == 0 and step != versions:
                    continue  # back-to-back sends: the next one may replace this one
                result = sender.wait_ack(timeout=60)
                assert result.complete and result.acked == tuple(range(n))
                assert result.version == version
                waited.append(version)
            probes = [children.get(reader, 60, f"collector {c}'s poll probes")
                      for c, (reader, _) in enumerate(pipes)]
            final = sender.send_weights_async()
            expected[final] = models.fingerprint(policy)
            sender.wait_ack(timeout=60)
            waited.append(final)
            stats = sender.stats
            assert stats.last is not None and stats.last.version == final
            assert len(stats.records) == len(waited)  # one record per completed wait
            sender.close()
        reports = children.results

    for cid, (pcid, nones, slowest, bounded, bounded_s) in enumerate(probes):
        assert pcid == cid
        assert nones == 100 and slowest < POLL_BOUND_S  # nothing new: None, at once
        assert bounded is None and bounded_s < 0.2 + POLL_BOUND_S
    for cid, report in enumerate(reports):
        assert report["before"] != expected[0], "collector started equal: test is void"
        assert report["first"] == 0
        seen = report["seen"]
        for version, fingerprint in seen.items():
            assert fingerprint == expected[version], f"collector {cid} version {version}"
        assert set(waited) <= set(seen), f"collector {cid} missed {set(waited) - set(seen)}"
        assert list(seen) == sorted(seen)  # applied in increasing order
        assert report["version"] == final
        assert report["max_poll_s"] < POLL_BOUND_S
        assert report["same_objects"]
        assert report["end"] == "ClosedError"


@pytest.mark.timeout(180)
def test_slow_collector_gets_newest_and_wait_ack_names_it() -> None:
    """Collector 0 stops polling while the learner sends versions 1..5.

    What the core guarantees (protocol.py): one message in flight per link, newer
    versions replace the pending one. Version 1 went out at once (the link was idle)
    and waits, received, in the collector's staging buffer; 2..4 were replaced. So
    collector 0's next two polls return exactly 1, then 5: never a backlog, at most
    one stale version. Collector 1 keeps up meanwhile.
    """
    mlp = models.make_mlp(seed=0)
    ctl_reader, ctl = harness.pipe()
    out, out_writer = harness.pipe()
    _quiet, quiet_writer = harness.pipe()  # collector 1 probes no version: never sends
    expected: dict[int, str] = {}
    with WeightSender(mlp, num_collectors=2, timeout=30) as sender:
        info = sender.connection_info
        targets = [(commanded_collector, (info, 0, ctl_reader, out_writer)),
                   (recording_collector, (info, 1, "mlp", 7, -1, quiet_writer))]
        with harness.spawn_collectors(targets, timeout=90) as children:
            sender.connect(timeout=90)
            assert children.get(out, 30, "collector 0 connected") == ("connected", 0, 0)
            for step in range(1, 6):
                models.mutate(mlp, step)
                expected[sender.send_weights_async()] = models.fingerprint(mlp)
            ctl.send(("drain", 5))
            result = sender.wait_ack(timeout=60)
            assert result.complete and result.version == 5
            kind, cid, got = children.get(out, 60, "collector 0's drain")
            assert (kind, cid) == ("drained", 0)
            assert [v for v, _ in got] == [1, 5]
            assert all(fp == expected[v] for v, fp in got)

            # Collector 0 stops polling: wait_ack names it (and only it), in time.
            models.mutate(mlp, 6)
            expected[sender.send_weights_async()] = models.fingerprint(mlp)
            start = time.monotonic()
            with pytest.raises(WeightSyncTimeout) as err:
                sender.wait_ack(timeout=1.0)
            elapsed = time.monotonic() - start
            assert 0.9 <= elapsed < 1.0 + 10
            assert "version 6" in str(err.value) and "0 (acked 5)" in str(err.value)
            assert "1 (acked" not in str(err.value)
            assert err.value.result.lagging == (0,) and err.value.result.acked == (1,)

            # It resumes: the same version completes, nothing was lost.
            ctl.send(("drain", 6))
            assert sender.wait_ack(timeout=60).complete
            kind, cid, got = children.get(out, 60, "collector 0's second drain")
            assert [v for v, _ in got] == [6] and got[0][1] == expected[6]
            ctl.send(("end",))
            sender.close()
            for call in (sender.send_weights_async, lambda: sender.wait_ack(1),
                         lambda: sender.connect(1)):
                with pytest.raises(ClosedError):
                    call()
        slow, fast = children.results

    assert slow == {"stream_end": "ClosedError", "poll_after_close": "ClosedError",
                    "connect_after_close": "ClosedError"}
    assert fast["end"] == "ClosedError" and fast["version"] == 6
    assert all(fast["seen"][v] == expected[v] for v in fast["seen"] if v > 0)
    assert {5, 6} <= set(fast["seen"])


@pytest.mark.timeout(120)
def test_layout_mismatch_refused_on_both_sides() -> None:
    mlp = models.make_mlp(seed=0)
    with WeightSender(mlp, num_collectors=1, timeout=30) as sender:
        targets = [(mismatched_collector, (sender.connection_info, 0))]
        with harness.spawn_collectors(targets, timeout=60) as children, \
                pytest.raises(LayoutMismatchError) as err:
            sender.connect(timeout=60)
        (report,) = children.results
    expected = [
        "extra: only on the collector",
        "1.num_batches_tracked: missing on the collector (the learner has it)",
        "1.running_mean: missing on the collector (the learner has it)",
        "1.running_var: missing on the collector (the learner has it)",
        "0.bias: dtype bfloat16 on the collector, float32 on the learner",
        "0.weight: dtype bfloat16 on the collector, float32 on the learner",
        "3.bias: shape (5,) on the collector, (4,) on the learner",
        "3.weight: shape (5, 32) on the collector, (4, 32) on the learner",
    ]
    # The learner's error names the collector and its process.
    assert f"collector 0 (pid {children.pids[0]})" in str(err.value)
    assert err.value.differences == expected
    # The collector's own error lists the same differences; nothing was applied.
    assert report["differences"] == expected
    assert report["message"].startswith("collector 0: weights differ from the learner's in 8")
    assert report["untouched"]
