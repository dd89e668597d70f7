"""A flood of joins that must all be refused (wrong or missing secret, ids past
``max_collectors``): each attempt ends in a typed error within its bound, the served
collector goes on receiving, and the learner keeps no residue per attempt (store keys,
threads)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from versioned import RX_TIMEOUT_S, expected, fingerprint, make_weights, publish

from weight_sync import WeightReceiver, WeightSender, WeightSyncError
from weight_sync.control.store import connect_client
from weight_sync.errors import AuthenticationError, ConfigError
from weight_sync.wire.auth import SECRET_ENV

pytestmark = pytest.mark.timeout(180)

SECRET = "flood-test secret"
ATTEMPTS = 24  # refused joins (each a fresh receiver and incarnation of id 1)
JOIN_S = 30.0  # bound on one refused attempt


@pytest.fixture(autouse=True)
def _no_secret_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SECRET_ENV, raising=False)


def _attempt(sender: WeightSender, cid: int, secret: str) -> BaseException | None:
    rx = WeightReceiver(make_weights(-7), sender.connection_info, cid, timeout=RX_TIMEOUT_S,
                        secret=secret)
    try:
        rx.connect(JOIN_S)
    except WeightSyncError as exc:
        return exc
    finally:
        rx.close()
    return None


def test_a_flood_of_refused_joins_leaves_nothing_behind() -> None:
    weights = make_weights(0)
    with WeightSender(weights, 1, max_collectors=2, timeout=RX_TIMEOUT_S,
                      secret=SECRET) as sender, ThreadPoolExecutor(4) as pool:
        mine = make_weights(-7)
        good = WeightReceiver(mine, sender.connection_info, 0, timeout=RX_TIMEOUT_S,
                              secret=SECRET)
        joined = pool.submit(good.connect, 60)
        sender.connect(timeout=60)
        assert joined.result(60) == 0
        info = sender.connection_info
        store = connect_client(info.host, info.port, 30)

        def settle() -> None:  # a round, so spent keys are collected on both sides
            v = publish(sender, weights)
            assert good.receive_weights(timeout=30) == v
            assert sender.wait_ack(timeout=30).acked == (0,)

        settle()
        keys_before, threads_before = store.num_keys(), threading.active_count()

        # Ids outside 0..max_collectors-1 are refused before any store call.
        for cid in (2, 17, -1):
            with pytest.raises(ConfigError, match=r"collector_id must be an int in \[0, 2\)"):
                WeightReceiver(make_weights(-7), info, cid, secret=SECRET)

        # The door refuses them in the background: keep publishing meanwhile (a flood
        # of joins must not hold up the sends).
        attempts = [pool.submit(_attempt, sender, 1, "guess" if i % 2 else "")
                    for i in range(ATTEMPTS)]
        pending = list(attempts)
        while pending:
            settle()
            pending = [a for a in pending if not a.done()]
        errors = [a.result(0) for a in attempts]
        assert all(isinstance(e, AuthenticationError) for e in errors), [
            repr(e) for e in errors if not isinstance(e, AuthenticationError)]
        assert sorted(sender.links) == [0]

        for _ in range(3):
            settle()
        # Not one key or thread per attempt: what is left is bounded by a few.
        assert store.num_keys() - keys_before <= 8, (keys_before, store.num_keys())
        assert threading.active_count() - threads_before <= 4
        v = publish(sender, weights)
        assert good.receive_weights(timeout=30) == v
        assert sender.wait_ack(timeout=30).complete
        assert fingerprint(mine) == expected(v)
        good.close()


def test_an_incarnation_that_says_hello_after_a_newer_one_gets_a_verdict(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Two processes claim the same id; the first to take an incarnation says hello
    last. The learner judges the newer one first, and still answers the older one
    when its hello comes (it used to wait out its whole join timeout)."""
    from weight_sync.control.channel import Control

    weights = make_weights(0)
    with WeightSender(weights, 1, max_collectors=2, timeout=RX_TIMEOUT_S,
                      secret=SECRET) as sender, ThreadPoolExecutor(3) as pool:
        good = WeightReceiver(make_weights(-7), sender.connection_info, 0,
                              timeout=RX_TIMEOUT_S, secret=SECRET)
        joined = pool.submit(good.connect, 60)
        sender.connect(timeout=60)
        assert joined.result(60) == 0
        real = Control.say_hello
        held, release = threading.Event(), threading.Event()

        def say_hello(self: Control, cid: int, inc: int, hello: object) -> None:
            if cid == 1 and inc == 1:
                held.set()
                assert release.wait(60)
            real(self, cid, inc, hello)  # type: ignore[arg-type]

        monkeypatch.setattr(Control, "say_hello", say_hello)

        def settle_until(attempt: object) -> None:
            while not attempt.done():  # type: ignore[attr-defined]
                v = publish(sender, weights)
                assert good.receive_weights(timeout=30) == v
                sender.wait_ack(timeout=30)

        late = pool.submit(_attempt, sender, 1, "guess")
        assert held.wait(30)
        newer = pool.submit(_attempt, sender, 1, "")
        settle_until(newer)  # judged while the older one still holds its hello
        assert isinstance(newer.result(0), AuthenticationError)
        release.set()
        settle_until(late)
        assert isinstance(late.result(0), AuthenticationError), late.result(0)
        assert sorted(sender.links) == [0]
        good.close()
