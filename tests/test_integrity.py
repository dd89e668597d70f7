"""Integrity without a secret, and with one: a message corrupted in flight (bits flipped
by the ``after_receive`` fault hook, after the transport delivered it and before the
link checks it) is refused, never applied, and fetched again; the collector ends up
bit-exact. For every registered transport, a user's own included."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch
from versioned import RX_TIMEOUT_S, expected, fingerprint, make_weights, publish

from weight_sync import WeightReceiver, WeightSender
from weight_sync.collector.hooks import ReceiverHooks
from weight_sync.errors import IntegrityError
from weight_sync.transports import get_transport, transport_names
from weight_sync.wire.hashing import NO_CHECKSUM, checksum_kind
from weight_sync.wire.layout import HEADER_BYTES
from weight_sync.wire.protocol import MAX_RESENDS

#: The user-written transport of the example package docs/examples/socket-transport,
#: found through its entry point (installed by the README's test command).
SOCKET = "socket"

pytestmark = pytest.mark.timeout(120)

TRANSPORTS = sorted(set(transport_names()) | {SOCKET})


class Flipper:
    """An ``after_receive`` hook that flips one payload bit of the first ``times``
    deliveries of every version >= 1, and records what it saw."""

    def __init__(self, times: int = 1) -> None:
        self.times = times
        self.flipped: dict[int, int] = {}  # version -> deliveries corrupted
        self.lock = threading.Lock()

    def __call__(self, version: int, message: torch.Tensor) -> None:
        with self.lock:
            done = self.flipped.get(version, 0)
            if version < 1 or done >= self.times:
                return
            self.flipped[version] = done + 1
        # A different bit each time, inside the payload (the header is checked apart).
        index = HEADER_BYTES + (version * 7 + done) % (message.numel() - HEADER_BYTES)
        message[index] ^= 1 << (done % 8)


@contextlib.contextmanager
def pair(transport: str, hook: Callable[[int, torch.Tensor], None], **sender_kw: Any) -> Iterator[
        tuple[WeightSender, WeightReceiver, dict[str, torch.Tensor], dict[str, torch.Tensor]]]:
    """A sender and one receiver (with ``hook``) at version 0; both closed afterwards."""
    weights, policy = make_weights(0), make_weights(-7)
    secret = sender_kw.pop("secret", "")
    with WeightSender(weights, 1, timeout=RX_TIMEOUT_S, transport=transport, secret=secret,
                      **sender_kw) as sender, ThreadPoolExecutor(1) as pool:
        rx = WeightReceiver(policy, sender.connection_info, 0, timeout=RX_TIMEOUT_S,
                            secret=secret, hooks=ReceiverHooks(after_receive=hook))
        try:
            joined = pool.submit(rx.connect, 60)
            sender.connect(timeout=60)
            assert joined.result(60) == 0
            assert sender.transports == {0: transport}
            yield sender, rx, policy, weights
        finally:
            rx.close()


def _receive_while_learner_waits(sender: WeightSender, rx: WeightReceiver) -> int | None:
    """The collector waits for the version while the learner sits in ``wait_ack`` (whose
    slices notice the collector's resend request)."""
    with ThreadPoolExecutor(1) as pool:
        acked = pool.submit(sender.wait_ack, 60)
        version = rx.receive_weights(timeout=60)
        acked.result(60)
    return version


LENDING = {name for name in TRANSPORTS if name != SOCKET
           and get_transport(name).lends}
# A lent (zero-copy) message is the learner's memory read in place: it is checked with a
# secret (its digest), not checksummed without one (test_lent_messages_not_checksummed).
CASES = [(t, s) for t in TRANSPORTS for s in ("", "s3cret") if s or t not in LENDING]


@pytest.mark.parametrize(("transport", "secret"), CASES,
                         ids=[f"{t}-{'secret' if s else 'checksum'}" for t, s in CASES])
def test_corrupted_in_flight_refused_and_fetched_again(transport: str, secret: str) -> None:
    hook = Flipper(times=1)
    with pair(transport, hook, secret=secret) as (sender, rx, policy, weights):
        applied: list[str] = []
        for _ in range(3):
            v = publish(sender, weights)
            assert _receive_while_learner_waits(sender, rx) == v
            applied.append(fingerprint(policy))
            assert applied[-1] == expected(v), "a corrupted message was applied"
        assert hook.flipped == {1: 1, 2: 1, 3: 1}, "the hook did not corrupt every version"
        assert rx.refused == 3  # each corrupted delivery refused, then sent again


@pytest.mark.parametrize(("transport", "secret"), [("distributed", ""), ("shm", "s3cret")])
def test_corrupted_every_time_fails_typed_nothing_applied(transport: str, secret: str) -> None:
    """Bounded: after MAX_RESENDS requests in a row the collector gives up with
    IntegrityError, and keeps its weights."""
    hook = Flipper(times=MAX_RESENDS + 1)
    with pair(transport, hook, secret=secret) as (sender, rx, policy, weights):
        publish(sender, weights)
        with ThreadPoolExecutor(1) as pool:
            pool.submit(sender.wait_ack, 10)  # resends the refused version; then times out
            with pytest.raises(IntegrityError, match="giving up"):
                rx.receive_weights(timeout=60)
        assert hook.flipped == {1: MAX_RESENDS + 1}
        assert fingerprint(policy) == expected(0), "a corrupted message was applied"


def test_lent_messages_not_checksummed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a secret, a collector that uses the learner's snapshot in place
    (``"shm"``) never hashes it (a pass over the weights per collector per version),
    though the learner stamps a checksum for its other links; every version bit-exact."""
    import weight_sync.collector.receiver_link as receiver_link

    checked: list[int] = []
    real = receiver_link.check_payload

    def counting(buffer: torch.Tensor, who: str, computed: int | None = None) -> None:
        checked.append(buffer.numel())
        real(buffer, who, computed)

    monkeypatch.setattr(receiver_link, "check_payload", counting)
    with pair("shm", lambda version, message: None) as (sender, rx, policy, weights):
        for _ in range(3):
            v = publish(sender, weights)
            assert _receive_while_learner_waits(sender, rx) == v
            assert fingerprint(policy) == expected(v)
    assert checked == []
    with pair("distributed", lambda version, message: None) as (sender, rx, policy, weights):
        v = publish(sender, weights)
        assert _receive_while_learner_waits(sender, rx) == v
    assert len(checked) == 2  # the initial sync and v: checked where bytes travel


def _checksum_words(seen: list[tuple[int, int]]) -> Callable[[int, torch.Tensor], None]:
    def record(version: int, message: torch.Tensor) -> None:
        seen.append((version, int(message[:HEADER_BYTES].view(torch.int64)[4])))
    return record


def test_learner_skips_the_checksum_while_every_collector_lends(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """With only zero-copy collectors, the learner stamps no checksum (nobody checks
    it); a collector that joins over a copying transport gets the version it catches up
    with checksummed, and every later version is, for both; all bit-exact."""
    import weight_sync.transports.shm_receiver as shm_receiver

    lent: list[tuple[int, int]] = []
    copied: list[tuple[int, int]] = []
    with pair("shm", _checksum_words(lent), max_collectors=2) as (sender, rx, policy, weights):
        v1 = publish(sender, weights)
        assert _receive_while_learner_waits(sender, rx) == v1
        assert lent == [(0, NO_CHECKSUM), (v1, NO_CHECKSUM)]
        # A second collector that cannot see the learner's /dev/shm: "distributed".
        monkeypatch.setattr(shm_receiver, "read_token", lambda path: None)
        other_policy = make_weights(-7)
        other = WeightReceiver(other_policy, sender.connection_info, 1, timeout=RX_TIMEOUT_S,
                               hooks=ReceiverHooks(after_receive=_checksum_words(copied)))
        try:
            with ThreadPoolExecutor(1) as pool:
                joined = pool.submit(other.connect, 60)
                sender.wait_for([1], timeout=60)
                assert joined.result(60) == v1
            assert sender.transports == {0: "shm", 1: "distributed"}
            assert fingerprint(other_policy) == expected(v1)
            v2 = publish(sender, weights)
            with ThreadPoolExecutor(2) as pool:
                got = [pool.submit(r.receive_weights, timeout=60) for r in (rx, other)]
                assert sender.wait_ack(timeout=60).complete
                assert [g.result(60) for g in got] == [v2, v2]
            assert fingerprint(policy) == fingerprint(other_policy) == expected(v2)
        finally:
            other.close()
    assert [kind != NO_CHECKSUM for _, kind in copied] == [True, True]
    assert lent[-1] == (v2, checksum_kind())  # a copying collector joined: stamped again


def test_checksum_off_stamps_nothing() -> None:
    """``checksum=False``: messages carry no checksum (header words 4-5 are zero), and
    clean messages still arrive bit-exact."""
    seen: list[list[int]] = []

    def record(version: int, message: torch.Tensor) -> None:
        seen.append(message[:HEADER_BYTES].view(torch.int64)[4:6].tolist())

    with pair("distributed", record, checksum=False) as (sender, rx, policy, weights):
        v = publish(sender, weights)
        assert _receive_while_learner_waits(sender, rx) == v
        assert fingerprint(policy) == expected(v)
    assert seen == [[0, 0], [0, 0]]


def test_refused_message_replaced_by_newer_pending_weights() -> None:
    """No backlog on a resend either: when newer weights were published while the
    corrupted message was out, the learner sends those instead of the refused version."""
    hook = Flipper(times=1)
    with pair("distributed", hook) as (sender, rx, policy, weights):
        publish(sender, weights)  # v1: in flight, corrupted on arrival
        v2 = publish(sender, weights)  # pending behind it
        assert _receive_while_learner_waits(sender, rx) == v2
        assert fingerprint(policy) == expected(v2)
        assert hook.flipped == {1: 1, 2: 1} and rx.refused == 2
