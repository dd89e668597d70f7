"""Bad input, each refused with a typed error and nothing half-applied: other keys,
shapes or dtypes; empty and non-contiguous weights; a duplicate id; repeated and
out-of-order versions; misuse before connect and after close; a port in use; an
unreachable store. Plus what the learner exposes to the network by default.

In one process (receivers in threads) where no process boundary is at stake.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from typing import Any

import pytest
import torch
from versioned import MARGIN_S, fingerprint, make_weights, set_version

from weight_sync import WeightReceiver, WeightSender
from weight_sync.errors import (
    ClosedError,
    ConnectionFailed,
    DuplicateCollectorError,
    InvalidWeightsError,
    LayoutMismatchError,
    PeerGone,
    ProtocolError,
)
from weight_sync.wire.layout import named_leaves
from weight_sync.wire.snapshots import SnapshotPool


def _connect_in_thread(rx: WeightReceiver, timeout: float = 30) -> dict[str, Any]:
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["version"] = rx.connect(timeout=timeout)
        except BaseException as exc:
            box["error"] = exc

    box["thread"] = threading.Thread(target=run, daemon=True)
    box["thread"].start()
    return box


def _connected_pair(weights: dict[str, torch.Tensor]) -> tuple[WeightSender, WeightReceiver]:
    # Sends: the tests hand the link snapshots of a private pool of their own.
    sender = WeightSender(make_weights(0), 1, timeout=20, transport="distributed")
    rx = WeightReceiver(weights, sender.connection_info, 0, timeout=20)
    box = _connect_in_thread(rx)
    sender.connect(timeout=30)
    box["thread"].join(30)
    assert box.get("version") == 0, box
    return sender, rx


@pytest.mark.parametrize("variant", ["other_key", "other_shape", "other_dtype"])
def test_layout_mismatch_both_sides_nothing_applied(variant: str) -> None:
    with WeightSender(make_weights(0), 1, timeout=20) as sender:
        theirs = make_weights(-3, variant=variant)
        before = fingerprint(theirs)
        rx = WeightReceiver(theirs, sender.connection_info, 0, timeout=20)
        box = _connect_in_thread(rx)
        with pytest.raises(LayoutMismatchError) as info:
            sender.connect(timeout=30)
        assert info.value.differences
        box["thread"].join(30)
        assert isinstance(box.get("error"), LayoutMismatchError), box
        assert fingerprint(theirs) == before
        rx.close()


def test_empty_weights_refused() -> None:
    with pytest.raises(InvalidWeightsError):
        WeightSender({}, 1)
    with pytest.raises(InvalidWeightsError):
        WeightSender(torch.nn.Module(), 1)


@pytest.mark.parametrize("kind", ["repeated", "older"])
def test_repeated_or_out_of_order_version_refused_nothing_applied(kind: str) -> None:
    """A learner bug (or a stale learner) sending a version the collector already has
    or an older one: refused with ProtocolError, the policy keeps its weights."""
    mine = make_weights(-1)
    sender, rx = _connected_pair(mine)
    with sender, rx:
        learner_weights = make_weights(0)
        set_version(learner_weights, 1)
        assert sender.send_weights_async(weights=learner_weights) == 1
        assert rx.receive_weights(timeout=10) == 1
        assert sender.wait_ack(timeout=10).complete
        before = fingerprint(mine)
        assert before == fingerprint(make_weights(1))
        # bypass the sender's version counter: hand the link a stale snapshot
        stale = 1 if kind == "repeated" else 0
        set_version(learner_weights, stale)
        pool = SnapshotPool(sender.layout, torch.device("cpu"))
        snap = pool.take(list(named_leaves(learner_weights).values()), stale)
        sender.links[0].send_weights_async(snap)
        snap.release()
        with pytest.raises(ProtocolError, match=f"received version {stale} after 1"):
            rx.receive_weights(timeout=10)
        assert fingerprint(mine) == before, "a refused version was applied"
        with pytest.raises(ProtocolError):  # the stream stays refused, not silently resumed
            rx.receive_weights(timeout=0)


def test_noncontiguous_params_duplicate_id_and_misuse() -> None:
    base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    learner = torch.nn.Module()
    learner.register_buffer("t", base.t())  # a non-contiguous view
    learner.register_buffer("s", base[:, ::3])
    assert not learner.t.is_contiguous()
    sender = WeightSender(learner, 1, timeout=20)
    with pytest.raises(ProtocolError, match="before connect"):
        sender.send_weights_async()
    with pytest.raises(ProtocolError, match="before connect"):
        sender.wait_ack(timeout=1)  # no send has happened: nothing to wait for
    collector = torch.nn.Module()
    collector.register_buffer("t", torch.zeros(10, 6))
    collector.register_buffer("s", torch.zeros(6, 4))
    rx = WeightReceiver(collector, sender.connection_info, 0, timeout=20)
    box = _connect_in_thread(rx)
    sender.connect(timeout=30)
    box["thread"].join(30)
    assert "error" not in box, box
    assert torch.equal(collector.t, base.t()) and torch.equal(collector.s, base[:, ::3])

    # a second receiver with the same id while the first is alive
    dup = WeightReceiver({"t": torch.zeros(10, 6), "s": torch.zeros(6, 4)},
                         sender.connection_info, 0, timeout=20)
    dbox = _connect_in_thread(dup)
    deadline = time.monotonic() + 30
    while dbox["thread"].is_alive() and time.monotonic() < deadline:
        sender.wait_ack(timeout=0.5)  # the learner handles joins inside its calls
        dbox["thread"].join(0.2)
    assert isinstance(dbox.get("error"), DuplicateCollectorError), dbox
    assert 0 in sender.links and not sender.failed

    # send_weights_async(weights=other layout): refused, version unchanged
    version = sender.version
    with pytest.raises(LayoutMismatchError):
        sender.send_weights_async(weights={"t": torch.zeros(3, 3)})
    assert sender.version == version
    with torch.no_grad():
        base.add_(1)
    assert sender.send_weights_async() == version + 1
    assert rx.receive_weights(timeout=10) == version + 1  # applies, then acks
    assert sender.wait_ack(timeout=30).complete
    assert torch.equal(collector.t, base.t())

    sender.close()
    with pytest.raises(ClosedError):
        sender.send_weights_async()
    with pytest.raises(ClosedError):
        sender.wait_ack(timeout=1)
    with pytest.raises(ClosedError):
        sender.wait_for([0], timeout=1)
    with pytest.raises((ClosedError, PeerGone)):
        rx.receive_weights(timeout=10)
    rx.close()
    dup.close()
    with pytest.raises(ClosedError):
        rx.receive_weights(timeout=0)


def test_port_in_use_and_unreachable_store() -> None:
    with WeightSender(make_weights(0), 1) as first:
        port = first.connection_info.port
        with pytest.raises(ConnectionFailed, match="in use"):
            WeightSender(make_weights(0), 1, port=port)
    with WeightSender(make_weights(0), 1) as gone:
        info = gone.connection_info
    # the store above is closed: nobody listens on its port any more
    rx = WeightReceiver(make_weights(0), info, 0, timeout=3)
    start = time.monotonic()
    with pytest.raises(ConnectionFailed):
        rx.connect(timeout=3)
    assert time.monotonic() - start < 3 + MARGIN_S


# -- what listens where ------------------------------------------------------------------
def _listening() -> dict[int, str]:
    """Port -> address of every TCP socket this process listens on (from /proc)."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found: dict[int, str] = {}
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        with open(f"/proc/net/{table}") as f:
            next(f)
            for line in f:
                cols = line.split()
                local, state, inode = cols[1], cols[3], cols[9]
                if state != "0A" or inode not in inodes:  # 0A = LISTEN
                    continue
                addr_hex, port_hex = local.split(":")
                raw = bytes.fromhex(addr_hex)
                # /proc prints each 32-bit word in host (little-endian) order
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                found[int(port_hex, 16)] = socket.inet_ntop(family, raw)
    return found


def _is_loopback(addr: str) -> bool:
    return addr.startswith("127.") or addr in ("::1", "::ffff:127.0.0.1")


def test_nothing_listens_beyond_loopback_by_default() -> None:
    before = set(_listening())
    sender, rx = _connected_pair(make_weights(-1))
    with sender, rx:
        ours = {p: a for p, a in _listening().items() if p not in before}
        port = sender.connection_info.port
        assert port in ours, ours
        # the store, and both ends' gloo pair sockets, listen on loopback only
        assert ours and all(_is_loopback(a) for a in ours.values()), ours
        assert sender.connection_info.host == "127.0.0.1"


def test_binding_every_interface_is_explicit() -> None:
    with WeightSender(make_weights(0), 1, host="0.0.0.0") as sender:
        info = sender.connection_info
        assert _listening()[info.port] == "0.0.0.0"
        assert info.host == socket.gethostname()  # what a remote collector dials
