"""The control plane: the key table, the protocol's values, and :class:`Control` over
the in-process twin (``HashStore``) and a real TCPStore (port 0). No processes."""

from __future__ import annotations

import socket
import threading
import time

import harness
import pytest
import torch.distributed as dist

from weight_sync import WeightSyncTimeout
from weight_sync.control.channel import Control
from weight_sync.control.store import StoreServer, connect_client
from weight_sync.errors import ConnectionFailed, PeerGone, ProtocolError
from weight_sync.wire.protocol import CLOSED, Hello, Keys, Update, Verdict

pytestmark = pytest.mark.timeout(30)


def _all_keys(keys: Keys) -> list[str]:
    names = [keys.layout, keys.info, keys.offers, keys.joins]
    for cid in range(3):
        names.append(keys.join(cid))
        for inc in (1, 2):
            names += [keys.hello(cid, inc), keys.admit(cid, inc), keys.link(cid, inc),
                      keys.alive(cid, inc), keys.bye(cid, inc)]
            names += [keys.update(cid, inc, seq) for seq in range(3)]
            names += [keys.ack(cid, inc, v) for v in range(3)]
    return names


def test_keys_unique_and_under_prefix() -> None:
    names = _all_keys(Keys("policy"))
    assert len(names) == len(set(names))
    assert all(name.startswith("ws/policy/") for name in names)
    # link/ is a prefix by design (a transport's keys go under it), and only of its own.
    links = [n for n in names if "/link/" in n]
    assert all(n.endswith("/") for n in links)
    assert not any(o.startswith(p) for p in links for o in names if o != p)


def test_streams_do_not_collide() -> None:
    a, b = set(_all_keys(Keys("a"))), set(_all_keys(Keys("ab")))
    assert not a & b
    assert all(not k.startswith("ws/a/") for k in b)


def test_values_round_trip_and_malformed_ones_are_protocol_errors() -> None:
    hello = Hello(pid=12, host="h", refused=("w: shape",), evidence={"shm": {"token": "t"}})
    assert Hello.decode(hello.encode().encode()) == hello
    for verdict in (Verdict(transport="shm"), Verdict(refusal="duplicate", reason="x y")):
        assert Verdict.decode(verdict.encode().encode()) == verdict
    assert Verdict(transport="shm").admitted and not Verdict(refusal="layout").admitted
    for update in (Update(3), Update(4, "psm_1 2"), Update(CLOSED)):
        assert Update.decode(update.encode().encode()) == update
    assert Update(CLOSED).closed and not Update(0).closed
    for raw, kind in ((b"not json", Hello), (b"[1]", Hello), (b'{"host": "h"}', Hello),
                      (b"{", Verdict), (b'{"nope": 1}', Verdict), (b"v3", Update)):
        with pytest.raises(ProtocolError, match="malformed"):
            kind.decode(raw)  # type: ignore[attr-defined]


@pytest.fixture(params=["hash", "tcp"])
def control(request: pytest.FixtureRequest) -> Control:
    """The same contract on the in-process twin and on a real TCPStore (port 0)."""
    if request.param == "hash":
        return Control(dist.HashStore(), "s", timeout=10)
    server = StoreServer("127.0.0.1", 0, timeout=10)
    request.addfinalizer(server.stop)
    return Control.connect("127.0.0.1", server.port, "s", timeout=10)


def test_waits_time_out_naming_what_and_the_missing_keys(control: Control) -> None:
    control.say_hello(0, 1, Hello(pid=1, host="h"))
    start = time.monotonic()
    with pytest.raises(WeightSyncTimeout) as info:
        control.wait_hellos([(0, 1), (1, 1), (2, 1)], 0.3, "the widgets")
    msg = str(info.value)
    assert "waiting for the widgets" in msg
    assert "ws/s/hello/1/1" in msg and "ws/s/hello/2/1" in msg and "hello/0/1" not in msg
    assert 0.25 <= time.monotonic() - start < 10  # waited the timeout, bounded
    assert isinstance(info.value, TimeoutError)
    with pytest.raises(WeightSyncTimeout, match=r"collector 3 \(incarnation 1\)"):
        control.wait_verdict(3, 1, 0.1)
    with pytest.raises(WeightSyncTimeout, match="link field 'addr' of collector 4"):
        control.link(4, 1).read("addr", 0.1)


def test_polls_never_block_and_bounded_gets_return_none(control: Control) -> None:
    start = time.monotonic()
    for _ in range(20):
        assert control.next_update(0, 1, 0, timeout=0) is None
        assert control.hello(0, 1) is None and not control.acked(0, 1, 0)
        assert control.joins() == 0 and control.incarnation(0) == 0
    assert time.monotonic() - start < 5  # hang guard: polls never wait for a key
    start = time.monotonic()
    assert control.next_update(0, 1, 0, timeout=0.2) is None
    assert 0.15 < time.monotonic() - start < 5


def test_a_join_and_a_message_round_trip(control: Control) -> None:
    assert control.join(2) == 1 and control.join(2) == 2 and control.joins() == 2
    assert control.incarnation(2) == 2
    control.post_update(2, 2, 0, Update(5, "seg"))
    assert control.next_update(2, 2, 0, timeout=0) == Update(5, "seg")
    control.ack(2, 2, 5)
    assert control.acked(2, 2, 5)
    control.wait_acks([(2, 2, 5)], 1, "acks")
    control.forget(2, 2, 0, 5)
    assert control.next_update(2, 2, 0, timeout=0) is None and not control.acked(2, 2, 5)
    control.beat(2, 2)
    control.beat(2, 2)
    assert control.heartbeats(2, 2) == 2
    assert not control.wait_byes([(2, 2)], 0.1)
    control.bye(2, 2)
    assert control.wait_byes([(2, 2)], 1) and control.wait_byes([], 0)


def test_a_wait_returns_when_another_thread_writes() -> None:
    server = StoreServer("127.0.0.1", 0, timeout=10)
    try:
        waiter = Control.connect("127.0.0.1", server.port, "s", timeout=10)
        # A TCPStore client must not be shared between threads: the writer gets its own.
        writer = Control.connect("127.0.0.1", server.port, "s", timeout=10)
        thread = threading.Thread(target=lambda: writer.ack(0, 1, 7))
        thread.start()
        waiter.wait_acks([(0, 1, 7)], 10, "the late ack")
        thread.join(10)
    finally:
        server.stop()


def test_a_stopped_server_is_peer_gone_at_once_and_stops_listening() -> None:
    server = StoreServer("127.0.0.1", 0, timeout=10)
    control = Control.connect("127.0.0.1", server.port, "s", timeout=10)
    control.ack(0, 1, 1)
    server.stop()
    server.stop()  # idempotent
    start = time.monotonic()
    with pytest.raises(PeerGone, match="waiting for acks"):
        control.wait_acks([(0, 1, 2)], 10, "acks")
    assert time.monotonic() - start < 5  # noticed at once, not after the timeout
    with pytest.raises(PeerGone):
        control.acked(0, 1, 1)
    assert not control.post_closed(0, 1, 0)  # best effort: False, no raise
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", server.port), timeout=5).close()


def test_connect_without_server_fails() -> None:
    port = harness.free_port()
    start = time.monotonic()
    with pytest.raises(ConnectionFailed, match=f"127.0.0.1:{port}"):
        connect_client("127.0.0.1", port, timeout=1.0)
    # torch retries once after the first timeout: bounded by ~2x, not by the timeout.
    assert time.monotonic() - start < 10


def test_server_on_a_busy_port_fails() -> None:
    busy = StoreServer("127.0.0.1", 0, timeout=5)
    try:
        with pytest.raises(ConnectionFailed, match=f"127.0.0.1:{busy.port}"):
            StoreServer("127.0.0.1", busy.port, timeout=5)
    finally:
        busy.stop()
