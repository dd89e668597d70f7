"""One contract, every registered transport: the built-ins and a user's own (``socket``,
provided by the installed example package ``docs/examples/socket-transport`` through
its entry point).

Each guarantee of the README's Reliability section that a transport could break is
checked here through ``WeightSender``/``WeightReceiver``: bit-exact weights after every
version, the snapshot property, no backlog for a slow collector, a collector killed
mid-transfer (real processes), close in both directions, a bad header refused with
nothing applied.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch
from harness import Cluster
from versioned import (
    MARGIN_S,
    RX_TIMEOUT_S,
    collector_main,
    expected,
    fingerprint,
    make_weights,
    publish,
    set_version,
)

from weight_sync import CollectorFailed, WeightReceiver, WeightSender
from weight_sync.collector.hooks import ReceiverHooks
from weight_sync.errors import ClosedError, ProtocolError
from weight_sync.transports import get_transport, transport_names

#: The user-written transport of the example package docs/examples/socket-transport,
#: found through its entry point (installed by the README's test command).
SOCKET = "socket"

pytestmark = pytest.mark.timeout(120)

TRANSPORTS = sorted(set(transport_names()) | {SOCKET})


@contextlib.contextmanager
def group(transport: str, n: int, hooks: ReceiverHooks | None = None,
          **sender_kw: Any) -> Iterator[tuple[WeightSender, list[WeightReceiver],
                                              list[dict[str, torch.Tensor]],
                                              dict[str, torch.Tensor]]]:
    """A sender and ``n`` receivers in this process (connected from threads), at
    version 0, checked to use ``transport``; everything closed afterwards."""
    weights = make_weights(0)
    policies = [make_weights(-7) for _ in range(n)]
    with WeightSender(weights, n, timeout=RX_TIMEOUT_S, transport=transport,
                      **sender_kw) as sender, ThreadPoolExecutor(n) as pool:
        receivers = [WeightReceiver(p, sender.connection_info, i, timeout=RX_TIMEOUT_S,
                                    hooks=hooks) for i, p in enumerate(policies)]
        joined = [pool.submit(r.connect, 60) for r in receivers]
        try:
            sender.connect(timeout=60)
            assert [j.result(timeout=60) for j in joined] == [0] * n
            assert sender.transports == dict.fromkeys(range(n), transport)
            assert all(r.transport == transport for r in receivers)
            yield sender, receivers, policies, weights
        finally:
            for r in receivers:
                r.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_every_version_bit_exact(transport: str) -> None:
    with group(transport, 2) as (sender, receivers, policies, weights):
        assert all(fingerprint(p) == expected(0) for p in policies)
        for _ in range(5):
            v = publish(sender, weights)
            for r, p in zip(receivers, policies, strict=True):
                assert r.receive_weights(timeout=30) == v
                assert fingerprint(p) == expected(v)
            assert sender.wait_ack(timeout=30).acked == (0, 1)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_snapshot_taken_at_send(transport: str) -> None:
    """The learner may change its weights right after send_weights_async: collectors
    get the weights as they were at the call, never a mix."""
    with group(transport, 1) as (sender, (rx,), (policy,), weights):
        v = publish(sender, weights)
        set_version(weights, 999)  # an optimizer step while the bytes are in flight
        assert rx.receive_weights(timeout=30) == v
        assert fingerprint(policy) == expected(v)
        sender.wait_ack(timeout=30)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_slow_collector_gets_in_flight_then_newest(transport: str) -> None:
    """No backlog: a collector that stops applying gets, when it resumes, at most the
    version already in flight, then the newest; the learner's buffers stay bounded."""
    with group(transport, 1) as (sender, (rx,), (policy,), weights):
        for _ in range(6):  # v1 goes out; v2..v6 collapse into the newest pending one
            publish(sender, weights)
        # in flight, pending (the newest), one being replaced; and the version the
        # collector uses, for a transport that lends it (zero-copy)
        assert sender.buffers_allocated <= 3 + get_transport(transport).lends
        applied = []
        resumed = threading.Thread(target=lambda: applied.extend(
            v for v in (rx.receive_weights(timeout=30), rx.receive_weights(timeout=30))))
        resumed.start()
        assert sender.wait_ack(timeout=30).complete
        resumed.join(30)
        assert applied == [1, 6]
        assert fingerprint(policy) == expected(6)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_bad_header_refused_nothing_applied(transport: str) -> None:
    """A message whose header is not ours (here: its magic flipped after it arrived)
    is refused with ProtocolError; the policy keeps its weights."""
    corrupt = threading.Event()

    def flip(version: int, buffer: torch.Tensor) -> None:
        if corrupt.is_set():
            buffer[0] ^= 0xFF

    with group(transport, 1, ReceiverHooks(after_receive=flip)) as (
            sender, (rx,), (policy,), weights):
        corrupt.set()
        publish(sender, weights)
        with pytest.raises(ProtocolError, match="not a weight-sync message"):
            rx.receive_weights(timeout=30)
        assert fingerprint(policy) == expected(0), "a refused message was applied"
        with pytest.raises(ProtocolError):  # the stream stays refused
            rx.receive_weights(timeout=0)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_close_in_both_directions(transport: str) -> None:
    """A collector that closes is reported by the learner's next wait_ack (by its
    transport, or within a heartbeat slice) while the others go on; the learner's close
    reaches the rest as ClosedError."""
    with group(transport, 2, liveness_timeout=2.0) as (sender, (rx0, rx1), _, weights):
        rx0.close()
        v = publish(sender, weights)
        assert rx1.receive_weights(timeout=30) == v
        start = time.monotonic()
        with pytest.raises(CollectorFailed, match=r"collector\(s\) \[0\] failed") as err:
            sender.wait_ack(timeout=30)
        assert time.monotonic() - start < 2.0 + MARGIN_S
        assert err.value.collector_id == 0 and err.value.result.acked == (1,)
        sender.close()
        with pytest.raises(ClosedError, match="closed"):
            rx1.receive_weights(timeout=30)


# -- a collector killed mid-transfer (real processes) -------------------------------
def collector_dies_receiving(info: Any, cid: int, out: Any, cmds: Any) -> None:
    """A collector that SIGKILLs itself once the transfer of version 1 has begun."""

    def die(version: int, buffer: torch.Tensor | None) -> None:
        if version >= 1:
            out.send(("mid", cid, version, None, os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)

    collector_main(info, cid, out, cmds, hooks=ReceiverHooks(before_receive=die))


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_collector_killed_mid_transfer(cluster: Cluster, transport: str) -> None:
    weights = make_weights(0)
    with WeightSender(weights, 2, timeout=RX_TIMEOUT_S, transport=transport) as sender:
        info = sender.connection_info
        cluster.start(info, 0, collector_dies_receiving)
        cluster.start(info, 1, collector_main)
        sender.connect(timeout=90)
        assert sender.transports == {0: transport, 1: transport}
        v = publish(sender, weights)
        cluster.take(lambda m: m[0] == "mid" and m[1] == 0, 30, "collector 0 to die")
        start = time.monotonic()
        with pytest.raises(CollectorFailed) as err:
            sender.wait_ack(timeout=30)
        assert time.monotonic() - start < 30 + MARGIN_S
        assert err.value.collector_id == 0 and err.value.result.acked == (1,)
        assert cluster.applied(1, v)[3] == expected(v)
        v = publish(sender, weights)  # the survivor keeps receiving
        assert sender.wait_ack(timeout=30).acked == (1,)
        assert cluster.applied(1, v)[3] == expected(v)
        cluster.stop(1)
