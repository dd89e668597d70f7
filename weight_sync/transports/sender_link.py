"""The learner's end of one link: :class:`SenderLink`.

At most one message is in flight per link: the next one is sent when the collector
acked the previous one. Versions published meanwhile collapse into the newest pending
snapshot, so a slow collector never builds a backlog and a gloo send never sits
waiting on a busy receiver long enough to trip gloo's timeout.
"""

from __future__ import annotations

import logging
import time
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from weight_sync.errors import (
    CollectorFailed,
    ProtocolError,
    WeightSyncError,
    WeightSyncTimeout,
)
from weight_sync.snapshots import Snapshot
from weight_sync.store import wait_keys
from weight_sync.transports.pair import LEARNER_RANK, PairLink, process_alive

__all__ = ["SenderLink"]

log = logging.getLogger(__name__)

# The "group" of a shared-memory link, which has none.
_NO_GROUP = object()

# How often progress() checks an unacked collector's pid (a /proc read), seconds.
_ALIVE_CHECK_S = 0.05


class _InFlight:
    """A message sent to the collector and not yet acknowledged."""

    def __init__(self, seq: int, snapshot: Snapshot, work: Any) -> None:
        self.seq = seq
        self.version = snapshot.version
        self.snapshot: Snapshot | None = snapshot
        self.work = work
        self.started = time.perf_counter()


class SenderLink(PairLink):
    """Sends packed snapshots to one collector and tracks its acks (learner side).

    Built by :class:`~weight_sync.WeightSender`, one per collector. Arguments as
    :class:`~weight_sync.transports.pair.PairLink`, plus:

    Args:
        liveness_timeout: declare the collector failed when its heartbeat stopped
            for this long while a message waits for its ack (``None``: never).
        shared_memory: the collector is on this host and reads each message from the
            snapshot's shared-memory segment: no pair group, no send.
    """

    rank = LEARNER_RANK

    def __init__(self, *args: Any, liveness_timeout: float | None = None,
                 shared_memory: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.liveness_timeout = liveness_timeout
        self.shared_memory = shared_memory
        self._beats = -1  # heartbeat counter last read
        self._beat_seen = time.monotonic()  # when it last moved
        self._beat_read = 0.0  # when it was last read
        self._alive_read = 0.0  # when the pid was last checked
        self._in_flight: _InFlight | None = None
        self._pending: Snapshot | None = None
        self.acked_version = -1
        """Newest version the collector applied."""
        self.last_round_s = float("nan")
        """Send-to-ack time of the last acked message, seconds."""
        self.failure: WeightSyncError | None = None
        """Why the link broke; once set, the link sends nothing more."""
        self.peer_pid: int | None = None
        """The collector's pid when it runs on this host: checked for liveness."""

    # -- torchrl's names -------------------------------------------------------------
    def setup_connection_and_weights_on_sender(self, snapshot: Snapshot) -> None:
        """Rendezvous with the collector and start the initial sync of ``snapshot``."""
        self.connect()
        self.send_weights_async(snapshot)

    def send_initial_weights(self, snapshot: Snapshot) -> None:
        """Send ``snapshot`` as the first message and wait until it is applied."""
        self.send_weights(snapshot)

    def send_weights(self, snapshot: Snapshot) -> None:
        """Send ``snapshot`` and wait (up to the link's timeout) until it is applied."""
        self.send_weights_async(snapshot)
        self.wait_ack(self.timeout)

    def send_weights_async(self, snapshot: Snapshot) -> None:
        """Send ``snapshot`` now if the link is idle, else keep it as the newest pending.

        An older pending snapshot is dropped: a slow collector gets the newest version.

        Raises:
            CollectorFailed: the link broke earlier.
        """
        self._require("send_weights_async")
        if self.failure is not None:
            raise self.failure
        if self._pending is not None:
            self._pending.release()
        self._pending = snapshot.retain()
        self.progress()

    def wait_ack(self, timeout: float) -> None:
        """Wait until the collector applied the newest version handed to this link.

        Raises:
            WeightSyncTimeout: naming the collector and version, after ``timeout`` s.
            CollectorFailed: the link broke.
        """
        deadline = time.monotonic() + timeout
        target = self.target_version
        while True:
            self.progress()
            if self.failure is not None:
                raise self.failure
            if self.acked_version >= target:
                return
            key = self.waiting_key
            remaining = deadline - time.monotonic()
            late = WeightSyncTimeout(f"{self._who()} did not ack version {target} within "
                                     f"{timeout:.2f}s (last acked: {self.acked_version})")
            if key is None or remaining <= 0:
                raise late
            try:
                wait_keys(self._store, [key], remaining, f"{self._who()} to ack")
            except WeightSyncTimeout as exc:
                raise late from exc

    # -- state -------------------------------------------------------------------------
    @property
    def target_version(self) -> int:
        """The newest version handed to this link (sent or pending)."""
        if self._pending is not None:
            return self._pending.version
        if self._in_flight is not None:
            return self._in_flight.version
        return self.acked_version

    @property
    def waiting_key(self) -> str | None:
        """The ack key whose arrival would let this link make progress, if any."""
        return None if self._in_flight is None else self._ack_key(self._in_flight)

    def _ack_key(self, flight: _InFlight) -> str:
        # The collector deletes it once the next message arrives (the learner sends
        # that one only after seeing this ack), keeping the store's key count bounded.
        return self._keys.ack(self.collector_id, self.incarnation, flight.version)

    def peer_alive(self) -> bool:
        """False once a same-host collector's process is known dead."""
        # A remote collector's death surfaces as a transfer error or a heartbeat.
        return self.peer_pid is None or process_alive(self.peer_pid)

    def progress(self, *, acked: bool = False) -> None:
        """Non-blocking: finish completed sends, record acks, start the pending send.

        Args:
            acked: the caller saw the in-flight message's ack key (saves a store
                round trip).

        A failure is recorded in :attr:`failure` (and logged), not raised.
        """
        group = self._require("progress")
        if self.failure is not None:
            return
        try:
            flight = self._in_flight
            if flight is not None:
                acked = acked or self._store.check([self._ack_key(flight)])
                if acked:
                    self._finish_work(flight)  # acked means received: the work is done
                    self.acked_version = flight.version
                    self.last_round_s = time.perf_counter() - flight.started
                    self._in_flight = None
                else:
                    self._check_alive(flight)
            if self._in_flight is None and self._pending is not None:
                self._start(group, self._pending)
                self._pending = None  # its reference moved to the in-flight record
        except WeightSyncError as exc:
            self._fail(exc)
        except (dist.DistError, RuntimeError) as exc:
            self._fail(CollectorFailed(f"link to {self._who()} failed: {exc}",
                                       self.collector_id))

    # -- internals ---------------------------------------------------------------------
    def _check_alive(self, flight: _InFlight) -> None:
        """Raise if the unacked ``flight`` cannot be acked any more: its send failed,
        the collector's process died, or its heartbeat stopped."""
        if flight.work is not None and flight.work.is_completed():
            self._finish_work(flight)  # raises if the transfer failed
        now = time.monotonic()
        if now - self._alive_read < _ALIVE_CHECK_S:
            return
        self._alive_read = now
        if not self.peer_alive():
            raise CollectorFailed(
                f"{self._who()} (pid {self.peer_pid}) died before acking version "
                f"{flight.version}", self.collector_id)
        self._check_heartbeat(flight)

    def _check_heartbeat(self, flight: _InFlight) -> None:
        """Raise if the collector stopped beating while ``flight`` waits for its ack.

        Catches what a pid check cannot: a collector on another host that vanished
        without closing its socket, or a process that is frozen. Reads the counter at
        most ten times per ``liveness_timeout``, and only while a message is unacked.
        """
        if self.liveness_timeout is None:
            return
        now = time.monotonic()
        if now - self._beat_read < self.liveness_timeout / 10:
            return
        self._beat_read = now
        beats = int(self._store.add(self._keys.alive(self.collector_id, self.incarnation), 0))
        if beats != self._beats:
            self._beats, self._beat_seen = beats, now
        elif now - self._beat_seen > self.liveness_timeout:
            raise CollectorFailed(
                f"{self._who()} sent no heartbeat for {now - self._beat_seen:.1f}s "
                f"(liveness_timeout {self.liveness_timeout}s) with version {flight.version} "
                f"unacked", self.collector_id)

    def connect(self, store: Any = None, timeout: float | None = None) -> None:
        if self.shared_memory:
            self._group = _NO_GROUP  # nothing to build: the store and the segment suffice
            return
        super().connect(store, timeout)

    def _start(self, group: Any, snapshot: Snapshot) -> None:
        key = self._keys.update(self.collector_id, self.incarnation, self._seq)
        if self.shared_memory:
            if snapshot.segment is None:
                raise ProtocolError(f"{self._who()}: a shared-memory link was handed a "
                                    f"snapshot outside shared memory")
            self._store.set(key, f"{snapshot.version} {snapshot.segment}")
            work = None
        else:
            self._store.set(key, str(snapshot.version))
            work = group.send([snapshot.buffer], self._peer, 0)
        self._in_flight = _InFlight(self._seq, snapshot, work)
        self._seq += 1

    def _finish_work(self, flight: _InFlight) -> None:
        work, flight.work = flight.work, None
        try:
            if work is not None:
                work.wait(timedelta(seconds=self.timeout))
        finally:
            if flight.snapshot is not None:
                flight.snapshot.release()
                flight.snapshot = None

    def _fail(self, exc: WeightSyncError) -> None:
        log.warning("%s", exc)  # the message names the link
        self.failure = exc
        self._release()

    def _release(self) -> None:
        if self._in_flight is not None and self._in_flight.snapshot is not None:
            self._in_flight.snapshot.release()
        if self._pending is not None:
            self._pending.release()
        self._in_flight, self._pending = None, None
