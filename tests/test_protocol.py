"""The key table and the store helpers, against in-process stores (no processes)."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import procs
import pytest
import torch.distributed as dist

from weight_sync import ConnectionFailed, PeerGone, WeightSyncTimeout
from weight_sync.protocol import ADMITTED, CLOSED, Keys
from weight_sync.store import connect_client, create_server, get_int, wait_keys


def _all_keys(keys: Keys) -> list[str]:
    names = [keys.layout, keys.joins]
    for cid in range(3):
        names.append(keys.join(cid))
        for inc in (1, 2):
            names += [keys.hello(cid, inc), keys.admit(cid, inc), keys.pair_prefix(cid, inc),
                      keys.alive(cid, inc)]
            names += [keys.update(cid, inc, seq) for seq in range(3)]
            names += [keys.ack(cid, inc, v) for v in range(3)]
    return names


def test_keys_unique_and_under_prefix() -> None:
    keys = Keys("policy")
    names = _all_keys(keys)
    assert len(names) == len(set(names))
    assert all(name.startswith("ws/policy/") for name in names)
    # No key is a prefix of another one's namespace by accident (pair/ is a prefix
    # by design: torch writes the pair group's keys under it).
    pair = [n for n in names if "/pair/" in n]
    assert all(n.endswith("/") for n in pair)
    assert not any(o.startswith(p) for p in pair for o in names if o != p)


def test_streams_do_not_collide() -> None:
    a, b = set(_all_keys(Keys("a"))), set(_all_keys(Keys("ab")))
    assert not a & b
    assert all(not k.startswith("ws/a/") for k in b)


def test_keys_encode_their_fields() -> None:
    keys = Keys("s")
    assert keys.update(2, 3, 4) != keys.update(2, 4, 3) != keys.update(3, 2, 4)
    assert keys.ack(1, 2, 10) != keys.ack(1, 21, 0)
    assert CLOSED < 0  # never a real version
    assert ADMITTED and not ADMITTED.lstrip("-").isdigit()


@pytest.fixture(params=["hash", "tcp"])
def store(request: pytest.FixtureRequest) -> dist.Store:
    """The same contract on the in-process twin and on a real TCPStore (port 0)."""
    if request.param == "hash":
        return dist.HashStore()
    return create_server("127.0.0.1", 0, timeout=10)


@pytest.mark.timeout(30)
def test_wait_keys_times_out_naming_missing_keys(store: dist.Store) -> None:
    store.set("present", "1")
    start = time.monotonic()
    with pytest.raises(WeightSyncTimeout) as info:
        wait_keys(store, ["present", "absent/1", "absent/2"], 0.3, "the widgets")
    elapsed = time.monotonic() - start
    msg = str(info.value)
    assert "waiting for the widgets" in msg
    assert "absent/1" in msg and "absent/2" in msg and "'present'" not in msg
    assert 0.25 <= elapsed < 10  # waited the timeout, bounded
    assert isinstance(info.value, TimeoutError)


@pytest.mark.timeout(30)
def test_wait_keys_returns_when_set_from_another_thread(store: dist.Store) -> None:
    ready = threading.Event()
    # A TCPStore client must not be shared between threads: the writer gets its own.
    other = store if isinstance(store, dist.HashStore) else connect_client(
        "127.0.0.1", store.port, timeout=10)

    def writer() -> None:
        ready.wait(10)
        other.set("late", "7")

    thread = threading.Thread(target=writer)
    thread.start()
    ready.set()
    wait_keys(store, ["late"], 10, "late")
    thread.join(10)
    assert get_int(store, "late") == 7


@pytest.mark.timeout(30)
def test_add_zero_and_check_are_non_blocking_polls(store: dist.Store) -> None:
    start = time.monotonic()
    assert not store.check(["nothing"])
    assert store.add("counter", 0) == 0
    assert store.add("counter", 1) == 1
    assert store.check(["counter"])
    assert time.monotonic() - start < 5  # hang guard: polls never wait for a key


@pytest.mark.timeout(30)
def test_wait_on_dead_server_is_peer_gone() -> None:
    server = create_server("127.0.0.1", 0, timeout=10)
    assert server.port > 0
    client = connect_client("127.0.0.1", server.port, timeout=10)
    client.set("k", "5")
    assert get_int(client, "k") == 5
    del server  # the server stops with its last reference
    start = time.monotonic()
    with pytest.raises(PeerGone, match="waiting for the learner"):
        wait_keys(client, ["never"], 10, "the learner")
    assert time.monotonic() - start < 5  # noticed at once, not after the timeout
    with pytest.raises(PeerGone, match="'k'"):
        get_int(client, "k")


@pytest.mark.timeout(30)
def test_connect_client_without_server_fails() -> None:
    port = procs.free_port()
    start = time.monotonic()
    with pytest.raises(ConnectionFailed, match=f"127.0.0.1:{port}"):
        connect_client("127.0.0.1", port, timeout=1.0)
    # torch retries once after the first timeout: bounded by ~2x, not by the timeout.
    assert time.monotonic() - start < 10


@pytest.mark.timeout(30)
def test_create_server_on_busy_port_fails() -> None:
    busy = create_server("127.0.0.1", 0, timeout=5)
    with pytest.raises(ConnectionFailed, match=f"127.0.0.1:{busy.port}"):
        create_server("127.0.0.1", busy.port, timeout=5)


def test_hash_store_wait_is_bounded() -> None:
    store = dist.HashStore()
    start = time.monotonic()
    with pytest.raises(dist.DistStoreError):
        store.wait(["x"], timedelta(seconds=0.2))
    assert time.monotonic() - start < 5
