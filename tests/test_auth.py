"""Authenticated joins and messages with a shared secret.

A collector without the secret, or with a wrong one, is refused at admission with
``AuthenticationError`` and never receives weights; a collector with a secret refuses a
learner without it; a signal a foreign process writes into the store (garbage, or an
old signal replayed) is refused with a typed error and nothing is applied. The secret
is never logged nor shown in a ``repr``. The foreign process is a raw ``TCPStore``
client; the environment-variable path runs in real collector processes."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pytest
from harness import pipe, spawn_collectors
from versioned import RX_TIMEOUT_S, expected, fingerprint, make_weights, publish

from weight_sync import (
    ConnectionInfo,
    ReceiverConfig,
    SenderConfig,
    WeightReceiver,
    WeightSender,
    WeightSyncError,
)
from weight_sync.collector.hooks import ReceiverHooks
from weight_sync.control.store import connect_client
from weight_sync.errors import AuthenticationError, ProtocolError
from weight_sync.wire.auth import SECRET_ENV, StreamKey
from weight_sync.wire.protocol import Keys

pytestmark = pytest.mark.timeout(90)

SECRET = "correct horse battery staple"


@pytest.fixture(autouse=True)
def _no_secret_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SECRET_ENV, raising=False)


def _join(pool: ThreadPoolExecutor, sender: WeightSender, cid: int, secret: str,
          **kw: Any) -> tuple[WeightReceiver, Future[int], dict]:
    weights = make_weights(-7)
    rx = WeightReceiver(weights, sender.connection_info, cid, timeout=RX_TIMEOUT_S,
                        secret=secret, **kw)
    return rx, pool.submit(rx.connect, 60), weights


@contextlib.contextmanager
def _served(secret: str, hooks: ReceiverHooks | None = None) -> Iterator[
        tuple[WeightSender, WeightReceiver, dict]]:
    """A learner and one collector, both with ``secret``, at version 0."""
    with WeightSender(make_weights(0), 1, timeout=RX_TIMEOUT_S, secret=secret) as sender, \
            ThreadPoolExecutor(1) as pool:
        rx, joined, policy = _join(pool, sender, 0, secret, hooks=hooks)
        try:
            sender.connect(timeout=60)
            assert joined.result(60) == 0
            yield sender, rx, policy
        finally:
            rx.close()


@pytest.mark.parametrize("theirs", ["", "wrong secret"], ids=["missing", "wrong"])
def test_collector_without_the_secret_refused_at_connect(
        theirs: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with WeightSender(make_weights(0), 1, timeout=RX_TIMEOUT_S, secret=SECRET) as sender, \
            ThreadPoolExecutor(1) as pool:
        rx, joined, policy = _join(pool, sender, 0, theirs)
        with pytest.raises(AuthenticationError, match="did not prove it knows the shared"):
            sender.connect(timeout=60)
        with pytest.raises(AuthenticationError, match="refused by the learner"):
            joined.result(60)
        assert fingerprint(policy) == fingerprint(make_weights(-7)), "weights were received"
        assert sender.links == {}
        rx.close()
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "refused collector 0" in logged
    assert SECRET not in logged and (not theirs or theirs not in logged)


def test_wrong_secret_at_run_time_refused_others_served() -> None:
    weights = make_weights(0)
    with WeightSender(weights, 1, max_collectors=2, timeout=RX_TIMEOUT_S,
                      secret=SECRET) as sender, ThreadPoolExecutor(2) as pool:
        good, joined_good, mine = _join(pool, sender, 0, SECRET)
        sender.connect(timeout=60)
        assert joined_good.result(60) == 0
        bad, joined_bad, theirs = _join(pool, sender, 1, "guess")
        with pytest.raises(AuthenticationError, match="collector 1"):
            sender.wait_for([1], timeout=60)
        assert isinstance(joined_bad.exception(60), AuthenticationError)
        v = publish(sender, weights)
        assert good.receive_weights(timeout=30) == v
        assert fingerprint(mine) == expected(v)
        assert sender.wait_ack(timeout=30).acked == (0,)
        assert fingerprint(theirs) == fingerprint(make_weights(-7))
        good.close()
        bad.close()


def test_collector_with_a_secret_refuses_a_learner_without() -> None:
    with WeightSender(make_weights(0), 1, max_collectors=2, timeout=RX_TIMEOUT_S) as sender, \
            ThreadPoolExecutor(2) as pool:
        plain, joined_plain, _ = _join(pool, sender, 0, "")  # no secret: as before
        sender.connect(timeout=60)
        assert joined_plain.result(60) == 0
        wary, joined_wary, theirs = _join(pool, sender, 1, SECRET)
        deadline = time.monotonic() + 60
        while not joined_wary.done() and time.monotonic() < deadline:
            sender.wait_ack(timeout=0.5)  # joins are handled inside the learner's calls
        with pytest.raises(AuthenticationError, match="does not prove it knows"):
            joined_wary.result(60)
        assert fingerprint(theirs) == fingerprint(make_weights(-7))
        plain.close()
        wary.close()


@pytest.mark.parametrize(("secret", "garbage", "error"), [
    (SECRET, b"5", AuthenticationError),                    # a plausible next version
    (SECRET, b"5/" + b"0" * 64 + b"/" + b"1" * 64, AuthenticationError),  # a made-up MAC
    (SECRET, b"-1", AuthenticationError),                   # an unsigned close
    (SECRET, b"\xff\x00 junk", ProtocolError),
    ("", b"\xff\x00 junk", ProtocolError),
], ids=["version", "fake-mac", "close", "bytes", "bytes-no-secret"])
def test_foreign_write_to_the_update_key_refused(secret: str, garbage: bytes,
                                                 error: type[WeightSyncError]) -> None:
    with _served(secret) as (sender, rx, policy):
        info = sender.connection_info
        foreign = connect_client(info.host, info.port, 10)  # a raw TCPStore client
        foreign.set(Keys(info.name).update(0, 1, 1), garbage)  # message 1 of link (0, 1)
        with pytest.raises(error):
            rx.receive_weights(timeout=30)
        assert rx.version == 0 and fingerprint(policy) == expected(0), "something applied"
        with pytest.raises(error):  # the stream stays refused
            rx.receive_weights(timeout=0)


def test_replayed_signal_of_an_older_version_refused() -> None:
    """Version 1's genuine signal, copied by a foreign process to where message 2's
    signal goes, is refused (its MAC binds it to message 1); nothing is applied."""
    captured: list[bytes] = []
    holder: list[ConnectionInfo] = []

    def capture(version: int, message: object) -> None:
        if version == 1:  # its signal is still in the store while the message is checked
            info = holder[0]
            spy = connect_client(info.host, info.port, 10)
            captured.append(bytes(spy.get(Keys(info.name).update(0, 1, 1))))

    weights = make_weights(0)
    with WeightSender(weights, 1, timeout=RX_TIMEOUT_S, secret=SECRET) as sender, \
            ThreadPoolExecutor(1) as pool:
        holder.append(sender.connection_info)
        rx, joined, policy = _join(pool, sender, 0, SECRET,
                                   hooks=ReceiverHooks(after_receive=capture))
        try:
            sender.connect(timeout=60)
            assert joined.result(60) == 0
            assert publish(sender, weights) == 1
            assert rx.receive_weights(timeout=30) == 1
            sender.wait_ack(timeout=30)
            assert captured and captured[0].startswith(b"1/"), captured
            info = sender.connection_info
            connect_client(info.host, info.port, 10).set(Keys(info.name).update(0, 1, 2),
                                                         captured[0])
            with pytest.raises(AuthenticationError, match="message 2's signal is not"):
                rx.receive_weights(timeout=30)
            assert rx.version == 1 and fingerprint(policy) == expected(1)
        finally:
            rx.close()


def test_secret_never_in_a_repr() -> None:
    assert SECRET not in repr(SenderConfig(secret=SECRET))
    assert SECRET not in repr(ReceiverConfig(secret=SECRET))
    assert SECRET not in repr(StreamKey(SECRET.encode(), "policy", "n"))
    with WeightSender(make_weights(0), 1, secret=SECRET) as sender:
        info = sender.connection_info
        assert SECRET not in repr(info) and SECRET not in info.to_json()
        assert SECRET not in repr(sender.config)


def _collector_with_env_secret(info: ConnectionInfo, cid: int, env_secret: str,
                               out: Any) -> tuple[str, str]:
    """A launched collector: its secret comes from the environment only."""
    os.environ[SECRET_ENV] = env_secret
    weights = make_weights(-7)
    rx = WeightReceiver(weights, info, cid, timeout=RX_TIMEOUT_S)
    try:
        try:
            rx.connect(timeout=60)
        except AuthenticationError as exc:
            out.send("refused")
            return type(exc).__name__, fingerprint(weights)
        out.send("connected")
        version = rx.receive_weights(timeout=None)
        return str(version), fingerprint(weights)
    finally:
        rx.close()


def test_secret_from_the_environment_in_collector_processes() -> None:
    weights = make_weights(0)
    with WeightSender(weights, 1, max_collectors=2, timeout=RX_TIMEOUT_S,
                      secret=SECRET) as sender:
        info = sender.connection_info
        good_r, good_w = pipe()
        bad_r, bad_w = pipe()
        with spawn_collectors([(_collector_with_env_secret, (info, 0, SECRET, good_w)),
                               (_collector_with_env_secret, (info, 1, "nope", bad_w))],
                              timeout=60) as procs:
            sender.connect(timeout=60)
            assert procs.get(good_r, 30, "collector 0 to connect") == "connected"
            with pytest.raises(AuthenticationError):
                sender.wait_for([1], timeout=60)
            assert procs.get(bad_r, 30, "collector 1's refusal") == "refused"
            v = publish(sender, weights)
            sender.wait_ack(timeout=30)
        assert procs.results == [(str(v), expected(v)),
                                 ("AuthenticationError", fingerprint(make_weights(-7)))]
