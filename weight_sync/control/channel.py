"""The control plane: every TCPStore read and write weight-sync makes, as typed calls.

:class:`Control` wraps one store client (a client must not be shared between threads:
give each thread that waits its own ``Control``). Its methods speak the protocol of
:mod:`weight_sync.wire.protocol`; every store operation goes through one wrapper that turns
torch's errors into weight-sync's own, by type: torch raises ``DistStoreError`` when a
wait or ``get`` times out and ``DistNetworkError`` when the server is gone.

:class:`LinkChannel` is the part of the store a transport may use for its own
rendezvous (the gloo pair group, or an address a transport publishes), scoped to one
link.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterable
from datetime import timedelta
from typing import Any, TypeVar

import torch.distributed as dist

from weight_sync.control.store import IN_FLIGHT, connect_client
from weight_sync.errors import (
    ClosedError,
    ConnectionFailed,
    PeerGone,
    ProtocolError,
    WeightSyncTimeout,
)
from weight_sync.wire.protocol import CLOSED, LEFT, Hello, Keys, Update, Verdict

__all__ = ["Control", "LinkChannel", "LinkId"]

T = TypeVar("T")

#: A link: (collector id, incarnation).
LinkId = tuple[int, int]


class _Timeout(Exception):
    """A store wait ran out (internal: each caller words its own error)."""


class _ClosedClient:
    """Stands in for a released store client: every operation is refused."""

    def __getattr__(self, name: str) -> Any:
        def refuse(*args: Any, **kwargs: Any) -> Any:
            raise ClosedError(f"store operation {name!r} on a closed control client")
        return refuse


def _call(what: str, op: Callable[[], T]) -> T:
    """Run one store operation; torch's errors become typed ones naming ``what``."""
    try:
        with IN_FLIGHT.entered(what):
            return op()
    except dist.DistStoreError as exc:  # torch's type for a timed-out wait or get
        raise _Timeout(str(exc)) from exc
    except dist.DistNetworkError as exc:
        raise PeerGone(f"store connection lost while {what}: {exc}") from exc
    except (dist.DistError, RuntimeError) as exc:
        raise ConnectionFailed(f"store operation failed while {what}: {exc}") from exc


def _delta(seconds: float) -> timedelta:
    return timedelta(seconds=max(seconds, 0.001))


class Control:
    """Typed store operations of one weight stream, on one store client.

    Args:
        store: a TCPStore client used from one thread only.
        name: the weight stream's name.
        timeout: bound on operations that do not take their own.
    """

    def __init__(self, store: dist.Store, name: str, timeout: float) -> None:
        self._store: Any = store
        self.keys = Keys(name)
        self.name = name
        self.timeout = timeout

    @classmethod
    def connect(cls, host: str, port: int, name: str, timeout: float) -> Control:
        """A new client of the store at ``host:port`` (retrying up to ``timeout``).

        Raises:
            ConnectionFailed: no store answered in time.
        """
        return cls(connect_client(host, port, timeout), name, timeout)

    def close(self) -> None:
        """Release the store client (its socket closes once no call is using it);
        later calls raise :class:`ClosedError`. Idempotent."""
        self._store = _ClosedClient()

    # -- waits ---------------------------------------------------------------------------
    def _wait(self, keys: list[str], timeout: float, what: str) -> None:
        start = time.monotonic()
        try:
            _call(f"waiting for {what}", lambda: self._store.wait(keys, _delta(timeout)))
        except _Timeout as exc:
            missing = [k for k in keys if not self._exists(k)]
            raise WeightSyncTimeout(f"timed out after {time.monotonic() - start:.2f}s waiting "
                                    f"for {what} (missing keys: {missing})") from exc

    def _exists(self, key: str) -> bool:
        try:
            return bool(_call(f"checking {key!r}", lambda: self._store.check([key])))
        except _Timeout:
            return False

    def _get_waiting(self, key: str, timeout: float, what: str) -> bytes | None:
        """The value of ``key`` once it exists (one round trip), ``None`` after
        ``timeout``. Sets the client's timeout: this client is the caller's own."""
        def get() -> bytes:
            self._store.set_timeout(_delta(timeout))
            return bytes(self._store.get(key))
        try:
            return _call(f"waiting for {what}", get)
        except _Timeout:
            return None

    def _get(self, key: str, what: str) -> bytes:
        try:
            return bytes(_call(f"reading {what}", lambda: self._store.get(key)))
        except _Timeout as exc:
            raise WeightSyncTimeout(f"{what} ({key!r}) is missing from the store") from exc

    def _set(self, key: str, value: str, what: str) -> None:
        _call(f"writing {what}", lambda: self._store.set(key, value))

    def _add(self, key: str, amount: int, what: str) -> int:
        return int(_call(f"updating {what}", lambda: self._store.add(key, amount)))

    # -- the stream (learner writes, collectors read) -----------------------------------
    def publish_stream(self, layout_json: str, info_json: str,
                       offers: dict[str, dict[str, str]], nonce: str) -> None:
        """Publish the layout, the connection info, the transport offers and this
        learner's nonce."""
        self._set(self.keys.nonce, nonce, "the learner's nonce")
        self._set(self.keys.layout, layout_json, "the layout")
        self._set(self.keys.info, info_json, "the connection info")
        self._set(self.keys.offers, json.dumps(offers), "the transport offers")

    def read_info(self, timeout: float) -> str:
        """The learner's connection info (JSON), once published."""
        self._wait([self.keys.info], timeout, f"the connection info of stream {self.name!r}")
        return self._get(self.keys.info, "the connection info").decode()

    def read_stream(self, timeout: float) -> tuple[str, dict[str, dict[str, str]], str]:
        """The learner's layout (JSON), transport offers and nonce, once published."""
        self._wait([self.keys.layout, self.keys.offers, self.keys.nonce], timeout,
                   "the learner's layout")
        offers = json.loads(self._get(self.keys.offers, "the transport offers"))
        if not isinstance(offers, dict):
            raise ProtocolError(f"malformed transport offers in the store: {offers!r}")
        nonce = self._get(self.keys.nonce, "the learner's nonce").decode()
        return self._get(self.keys.layout, "the layout").decode(), offers, nonce

    # -- joining -----------------------------------------------------------------------
    def join(self, cid: int) -> int:
        """Claim the next incarnation of collector ``cid``; returns it."""
        inc = self._add(self.keys.join(cid), 1, f"collector {cid}'s join counter")
        self._add(self.keys.joins, 1, "the join counter")
        return inc

    def joins(self) -> int:
        """How many joins happened in all (cheap to poll)."""
        return self._add(self.keys.joins, 0, "the join counter")

    def incarnation(self, cid: int) -> int:
        """The newest incarnation of collector ``cid`` (0: never joined)."""
        return self._add(self.keys.join(cid), 0, f"collector {cid}'s join counter")

    def wait_joined(self, cids: Iterable[int], timeout: float) -> None:
        ids = list(cids)
        self._wait([self.keys.join(c) for c in ids], timeout, f"collectors {ids} to join")

    def say_hello(self, cid: int, inc: int, hello: Hello) -> None:
        self._set(self.keys.hello(cid, inc), hello.encode(), f"collector {cid}'s hello")

    def hello(self, cid: int, inc: int) -> Hello | None:
        """Collector ``cid``'s hello for incarnation ``inc``, if written yet."""
        key = self.keys.hello(cid, inc)
        if not self._exists(key):
            return None
        return Hello.decode(self._get(key, f"collector {cid}'s hello"))

    def wait_hellos(self, links: Iterable[LinkId], timeout: float, what: str) -> None:
        self._wait([self.keys.hello(c, i) for c, i in links], timeout, what)

    def admit(self, cid: int, inc: int, verdict: Verdict) -> None:
        self._set(self.keys.admit(cid, inc), verdict.encode(), f"collector {cid}'s admission")

    def forget_hello(self, cid: int, inc: int) -> None:
        """Learner: delete a hello once judged (read once; a refused flood of joins
        must not leave a key per attempt)."""
        key = self.keys.hello(cid, inc)
        _call(f"deleting collector {cid}'s hello", lambda: self._store.delete_key(key))

    def wait_verdict(self, cid: int, inc: int, timeout: float) -> Verdict:
        """Collector: the learner's verdict on incarnation ``inc``, consumed (its key
        is deleted: this collector is its only reader)."""
        key = self.keys.admit(cid, inc)
        self._wait([key], timeout, f"the learner to admit collector {cid} (incarnation {inc})")
        verdict = Verdict.decode(self._get(key, f"collector {cid}'s admission"))
        _call(f"deleting collector {cid}'s admission", lambda: self._store.delete_key(key))
        return verdict

    def link(self, cid: int, inc: int) -> LinkChannel:
        """The store space of one link's transport."""
        return LinkChannel(self, self.keys.link(cid, inc), cid, inc)

    # -- messages ----------------------------------------------------------------------
    def post_update(self, cid: int, inc: int, seq: int, update: Update) -> None:
        self._set(self.keys.update(cid, inc, seq), update.encode(),
                  f"update {seq} for collector {cid}")

    def post_closed(self, cid: int, inc: int, seq: int, update: Update | None = None) -> bool:
        """Best effort: signal the end of the stream on message ``seq`` (``update``: a
        signed ``Update(CLOSED)``); False if the store is gone (the peer then learns it
        from its own wait)."""
        try:
            self.post_update(cid, inc, seq, update or Update(CLOSED))
        except ConnectionFailed:
            return False
        return True

    def next_update(self, cid: int, inc: int, seq: int, timeout: float) -> Update | None:
        """Message ``seq``'s signal once written, ``None`` if not within ``timeout``
        (``0``: a poll that never blocks)."""
        key = self.keys.update(cid, inc, seq)
        what = f"message {seq} for collector {cid}"
        if timeout == 0:
            raw = self._get(key, what) if self._exists(key) else None
        else:
            raw = self._get_waiting(key, timeout, what)
        return None if raw is None else Update.decode(raw)

    def ack(self, cid: int, inc: int, version: int) -> None:
        # An add, not a set: TCPStore answers an add but not a set, so only after an
        # add is the key on the server before the call returns (a learner checking right
        # after a set from another client missed 20 of 5,000 here), and a version
        # published just after an ack is sent at once rather than at the next wait.
        self._add(self.keys.ack(cid, inc, version), 1,
                  f"collector {cid}'s ack of version {version}")

    def acked(self, cid: int, inc: int, version: int) -> bool:
        return self._exists(self.keys.ack(cid, inc, version))

    def wait_acks(self, acks: Iterable[tuple[int, int, int]], timeout: float,
                  what: str) -> None:
        """Block until every ``(cid, inc, version)`` is acked.

        Raises:
            WeightSyncTimeout: naming ``what`` and the missing acks.
        """
        self._wait([self.keys.ack(c, i, v) for c, i, v in acks], timeout, what)

    def ask_resend(self, cid: int, inc: int, seq: int) -> None:
        """Collector: message ``seq`` failed its checksum; ask for its version again."""
        self._set(self.keys.resend(cid, inc, seq), "1",
                  f"collector {cid}'s request to resend message {seq}")

    def take_resend(self, cid: int, inc: int, seq: int) -> bool:
        """Learner: whether the collector asked for message ``seq`` again (the request
        is consumed: one round trip)."""
        key = self.keys.resend(cid, inc, seq)
        return bool(_call(f"reading collector {cid}'s resend requests",
                          lambda: self._store.delete_key(key)))

    def forget(self, cid: int, inc: int, seq: int, version: int | None) -> None:
        """Delete the spent keys of message ``seq`` (and the ack of ``version``): best
        effort, a lost store shows up in the next wait."""
        keys = [self.keys.update(cid, inc, seq)]
        if version is not None:
            keys.append(self.keys.ack(cid, inc, version))
        for key in keys:
            try:
                _call("deleting spent keys", lambda: self._store.delete_key(key))  # noqa: B023
            except (ConnectionFailed, _Timeout):
                return

    def forget_link(self, cid: int, inc: int, seqs: Iterable[int],
                    versions: Iterable[int]) -> None:
        """Learner: delete what a retired incarnation left in the store (its collector
        is gone and will not): its heartbeat and goodbye, the signals of messages
        ``seqs`` and their resend requests, the acks of ``versions``. Best effort, as
        :meth:`forget`."""
        keys = [self.keys.alive(cid, inc), self.keys.bye(cid, inc)]
        for seq in seqs:
            keys += [self.keys.update(cid, inc, seq), self.keys.resend(cid, inc, seq)]
        keys += [self.keys.ack(cid, inc, version) for version in versions]
        for key in keys:
            try:
                _call("deleting a retired link's keys",
                      lambda: self._store.delete_key(key))  # noqa: B023
            except (ConnectionFailed, _Timeout):
                return

    # -- liveness and goodbyes ---------------------------------------------------------
    def learner_beat(self) -> None:
        self._add(self.keys.beat, 1, "the learner's heartbeat")

    def learner_beats(self) -> int:
        """The learner's heartbeat counter (0 before its first beat)."""
        return self._add(self.keys.beat, 0, "the learner's heartbeat")

    def beat(self, cid: int, inc: int) -> None:
        self._add(self.keys.alive(cid, inc), 1, f"collector {cid}'s heartbeat")

    def heartbeats(self, cid: int, inc: int) -> int:
        """The heartbeat counter; negative once the collector closed (left)."""
        return self._add(self.keys.alive(cid, inc), 0, f"collector {cid}'s heartbeat")

    def leave(self, cid: int, inc: int) -> None:
        """Best effort: tell the learner this collector closed (no more reads, no
        more beats): its heartbeat counter goes negative, and it says goodbye."""
        with contextlib.suppress(ConnectionFailed):
            self._add(self.keys.alive(cid, inc), LEFT, f"collector {cid}'s heartbeat")
        self.bye(cid, inc)

    def bye(self, cid: int, inc: int) -> None:
        """Best effort: tell the learner the close was read."""
        with contextlib.suppress(ConnectionFailed):
            self._set(self.keys.bye(cid, inc), "1", f"collector {cid}'s goodbye")

    def wait_byes(self, links: Iterable[LinkId], timeout: float) -> bool:
        """Wait until the given collectors read the close; False if not all did."""
        keys = [self.keys.bye(c, i) for c, i in links]
        if not keys:
            return True
        try:
            self._wait(keys, timeout, "collectors to read the close")
        except (WeightSyncTimeout, ConnectionFailed):
            return False
        return True


class LinkChannel:
    """The store space of one link's transport: its pair group's rendezvous, or small
    values one end publishes for the other (an address, a port)."""

    def __init__(self, control: Control, prefix: str, cid: int, inc: int) -> None:
        self._control = control
        self._prefix = prefix
        self.collector_id = cid
        self.incarnation = inc

    def prefix_store(self) -> Any:
        """A ``PrefixStore`` over this link's space, for a process group's rendezvous."""
        return dist.PrefixStore(self._prefix, self._control._store)

    def publish(self, field: str, value: str) -> None:
        self._control._set(self._prefix + field, value, f"link field {field!r}")

    def read(self, field: str, timeout: float) -> str:
        """The value of ``field`` once the other end published it.

        Raises:
            WeightSyncTimeout: not published within ``timeout``.
        """
        what = (f"link field {field!r} of collector {self.collector_id} "
                f"(incarnation {self.incarnation})")
        raw = self._control._get_waiting(self._prefix + field, timeout, what)
        if raw is None:
            raise WeightSyncTimeout(f"timed out after {timeout:.2f}s waiting for {what}")
        return raw.decode()
