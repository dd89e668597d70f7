"""The learner's end of one collector's link: :class:`SenderLink`.

At most one message is in flight per link: the next one is sent when the collector
acked the previous one. Versions published meanwhile collapse into the newest pending
snapshot, so a slow collector never builds a backlog and a send never sits waiting on a
busy receiver long enough to trip a transport's timeout. The bytes move through the
link's transport end (any :class:`~weight_sync.transports.base.SenderTransport`); acks,
liveness, the no-backlog rule, resends of a message a collector found corrupted, and
(with a shared secret) signing the signals live here, the same for every transport.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque

from weight_sync.control.channel import Control
from weight_sync.errors import CollectorFailed, ConnectionFailed, WeightSyncError
from weight_sync.metrics import SyncStats
from weight_sync.transports.base import LinkSpec, SenderTransport, Sending
from weight_sync.wire.auth import StreamKey
from weight_sync.wire.delta import DeltaEncoder
from weight_sync.wire.protocol import CLOSED, MAX_RESENDS, Update
from weight_sync.wire.snapshots import Snapshot

__all__ = ["SenderLink", "process_alive"]

log = logging.getLogger(__name__)

# How often progress() checks an unacked collector's pid (a /proc read), seconds.
_ALIVE_CHECK_S = 0.05


# Signals and acks a collector may leave behind unspent (it deletes older ones itself).
_KEPT_SIGNALS = 4

def process_alive(pid: int) -> bool:
    """False once process ``pid`` (on this host) is gone or a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a dead child its parent has not reaped yet still answers kill(pid, 0)
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


class _InFlight:
    """A message sent to the collector and not yet acknowledged."""

    def __init__(self, seq: int, snapshot: Snapshot, sending: Sending | None,
                 resends: int = 0) -> None:
        self.seq = seq
        self.version = snapshot.version
        self.snapshot: Snapshot | None = snapshot
        self.sending = sending
        self.resends = resends  # times this version was sent again on request


class SenderLink:
    """Sends packed snapshots to one collector through a transport end, and tracks its
    acks and liveness (learner side). Built by the learner's admissions.

    Args:
        spec: the link.
        end: the transport's learner end.
        transport: the transport's registered name.
        control: the learner's main-thread store client.
        liveness_timeout: declare the collector failed when its heartbeat stopped
            for this long while a message waits for its ack (``None``: never).
        peer_pid: the collector's pid when it runs on this host (checked for liveness).
        lends: the collector uses each snapshot in place until it acks a newer one (a
            zero-copy transport): the link holds the acked snapshot until then.
        key: with a shared secret, the stream's key: every signal is signed with it
            (the snapshots then carry their digest).
        changed_only: send only the leaves that changed since the version the collector
            acked (:mod:`weight_sync.wire.delta`; the snapshots then carry leaf digests).
        stats: where each message handed to the transport is counted.
        local: the collector was proven to share this host (it checks no payload
            checksum: nothing crosses a wire).
    """

    def __init__(self, spec: LinkSpec, end: SenderTransport, transport: str,
                 control: Control, *, liveness_timeout: float | None = None,
                 peer_pid: int | None = None, lends: bool = False,
                 key: StreamKey | None = None, changed_only: bool = False,
                 stats: SyncStats | None = None, streams: bool = False,
                 local: bool = False) -> None:
        self.spec = spec
        self._key = key
        self._delta = DeltaEncoder(spec.layout) if changed_only else None
        self._stats = stats
        self.collector_id = spec.collector_id
        self.incarnation = spec.incarnation
        self.transport = transport
        self.liveness_timeout = liveness_timeout
        self.peer_pid = peer_pid
        self.lends = lends
        self.local = local
        self._end = end
        self._streams = streams
        self._control = control
        self._seq = 0  # next message number
        self._versions: deque[int] = deque(maxlen=_KEPT_SIGNALS)  # of the last messages
        self._beats = -1  # heartbeat counter last read
        self._beat_seen = time.monotonic()  # when it last moved
        self._beat_read = 0.0  # when it was last read
        self._alive_read = 0.0  # when the pid was last checked
        self._in_flight: _InFlight | None = None
        self._pending: Snapshot | None = None
        self._in_use: Snapshot | None = None  # lent to the collector, acked
        self._closed = False
        self.acked_version = -1
        """Newest version the collector applied."""
        self.failure: WeightSyncError | None = None
        """Why the link broke; once set, the link sends nothing more."""

    def _who(self) -> str:
        return self.spec.who()

    def connect(self, control: Control, timeout: float) -> None:
        """Rendezvous of the transport ends (bounded); ``control`` is the calling
        thread's own store client."""
        self._end.connect(control.link(self.collector_id, self.incarnation), timeout)

    def send_weights_async(self, snapshot: Snapshot) -> None:
        """Send ``snapshot`` now if the link is idle, else keep it as the newest pending.

        An older pending snapshot is dropped: a slow collector gets the newest version.
        A link that broke keeps its failure (reported by the sender) and sends nothing.
        """
        if self.failure is not None or self._closed:
            return
        if self._pending is not None:
            self._pending.release()
        self._pending = snapshot.retain()
        self.progress()

    @property
    def verifies(self) -> bool:
        """Whether the collector checks the payload checksum of what it is sent (not
        where the bytes never left this host's memory)."""
        return not (self.lends or self.local)

    @property
    def takes_unpacked(self) -> bool:
        """True if the link would start sending a snapshot at once, and can while it is
        still being packed: it is idle, and its transport streams whole snapshots (no
        digest to sign first, no changed-only cut to make)."""
        return (self._streams and self._key is None and self._delta is None
                and self.failure is None and not self._closed
                and self._in_flight is None and self._pending is None)

    @property
    def target_version(self) -> int:
        """The newest version handed to this link (sent or pending)."""
        if self._pending is not None:
            return self._pending.version
        if self._in_flight is not None:
            return self._in_flight.version
        return self.acked_version

    @property
    def awaited_ack(self) -> tuple[int, int, int] | None:
        """``(collector id, incarnation, version)`` of the ack this link waits for."""
        flight = self._in_flight
        return None if flight is None else (self.collector_id, self.incarnation,
                                            flight.version)

    def peer_alive(self) -> bool:
        """False once a same-host collector's process is known dead."""
        # A remote collector's death surfaces as a transfer error or a heartbeat.
        return self.peer_pid is None or process_alive(self.peer_pid)

    @property
    def waiting_to_send(self) -> bool:
        """A newer snapshot waits behind the one in flight (started by :meth:`progress`
        once that one is acked)."""
        return self._pending is not None and self._in_flight is not None and not self._closed

    def progress(self, *, acked: bool = False) -> None:
        """Non-blocking: record acks, check liveness, start the pending send.

        Args:
            acked: the caller saw the in-flight message's ack (saves a store round trip).

        A failure is recorded in :attr:`failure` (and logged), not raised.
        """
        if self.failure is not None or self._closed:
            return
        try:
            flight = self._in_flight
            if flight is not None:
                if acked or self._control.acked(self.collector_id, self.incarnation,
                                                flight.version):
                    self._finish(flight)  # acked means received: the transfer is over
                    self.acked_version = flight.version
                    self._in_flight = None
                else:
                    self._check_alive(flight)
            if self._in_flight is None and self._pending is not None:
                self._start(self._pending)
                self._pending = None  # its reference moved to the in-flight record
        except ConnectionFailed as exc:
            self._fail(CollectorFailed(f"link to {self._who()} failed: {exc}",
                                       self.collector_id))
        except WeightSyncError as exc:
            self._fail(exc)

    def _signal(self, update: Update, digest: str = "") -> Update:
        if self._key is None:
            return update
        return self._key.sign(self.collector_id, self.incarnation, self._seq, update, digest)

    def _start(self, snapshot: Snapshot, resends: int = 0) -> None:
        message, delta = snapshot, None
        if self._delta is not None:
            if resends:  # what the collector holds may be what it refused: go whole
                self._delta.forget()
            message, delta = self._delta.encode(snapshot)
        sending = self._end.send(message)
        if self._stats is not None:
            self._stats.count_message(message.buffer.numel(), changed_only=delta is not None)
        self._in_flight = _InFlight(self._seq, snapshot, sending, resends)
        self._versions.append(snapshot.version)
        update = Update(snapshot.version, sending.note,
                        delta="" if delta is None else delta.encode())
        self._control.post_update(self.collector_id, self.incarnation, self._seq,
                                  self._signal(update, snapshot.digest))
        self._seq += 1

    def _resend(self, flight: _InFlight) -> None:
        """The collector refused ``flight`` (failed checksum): send its version again,
        or the newest pending one, as the next message."""
        if flight.resends >= MAX_RESENDS:
            raise CollectorFailed(
                f"{self._who()} refused version {flight.version} {flight.resends + 1} "
                f"times (corrupted in transit each time)", self.collector_id)
        if flight.snapshot is None or not flight.snapshot.abandoned:
            log.warning("%s refused version %d (corrupted in transit): sending it again",
                        self._who(), flight.version)
        sending, flight.sending = flight.sending, None
        if sending is not None:
            sending.finish(self.spec.timeout)  # received (corrupted): over
        snapshot, flight.snapshot = flight.snapshot, None
        self._in_flight = None
        assert snapshot is not None
        if self._pending is not None:  # newer weights meanwhile: send those (no backlog)
            snapshot.release()
            snapshot, self._pending = self._pending, None
        elif snapshot.abandoned:  # its pack failed: nothing to send until the next version
            snapshot.release()
            return
        self._start(snapshot, flight.resends + 1)  # the snapshot's reference moves on

    def _finish(self, flight: _InFlight) -> None:
        """The collector acked ``flight``: the transfer is over, and the snapshot it
        used before is no longer in use (it switched to this one before acking)."""
        sending, flight.sending = flight.sending, None
        snapshot, flight.snapshot = flight.snapshot, None
        try:
            if sending is not None:
                sending.finish(self.spec.timeout)
        finally:
            if self._in_use is not None:
                self._in_use.release()
                self._in_use = None
            if snapshot is not None:
                if self._delta is not None:
                    self._delta.held(snapshot)
                if self.lends:
                    self._in_use = snapshot
                else:
                    snapshot.release()

    def _check_alive(self, flight: _InFlight) -> None:
        """Raise if the unacked ``flight`` cannot be acked any more: its transfer
        failed, the collector's process died, or its heartbeat stopped."""
        if flight.sending is not None and flight.sending.done():  # raises if it failed
            flight.sending = None
        now = time.monotonic()
        if now - self._alive_read < _ALIVE_CHECK_S:
            return
        self._alive_read = now
        if not self.peer_alive():
            raise CollectorFailed(
                f"{self._who()} (pid {self.peer_pid}) died before acking version "
                f"{flight.version}", self.collector_id)
        if self._control.take_resend(self.collector_id, self.incarnation, flight.seq):
            self._resend(flight)
            return
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
        beats = self._control.heartbeats(self.collector_id, self.incarnation)
        if beats < 0:
            if self._control.acked(self.collector_id, self.incarnation, flight.version):
                return  # it acked, then left, since the ack was read: the next call sees it
            raise CollectorFailed(f"{self._who()} closed its receiver with version "
                                  f"{flight.version} unacked", self.collector_id)
        if beats != self._beats:
            self._beats, self._beat_seen = beats, now
        elif now - self._beat_seen > self.liveness_timeout:
            raise CollectorFailed(
                f"{self._who()} sent no heartbeat for {now - self._beat_seen:.1f}s "
                f"(liveness_timeout {self.liveness_timeout}s) with version {flight.version} "
                f"unacked", self.collector_id)

    def _fail(self, exc: WeightSyncError) -> None:
        log.warning("%s", exc)  # the message names the link
        self.failure = exc
        self._drop_snapshots()

    def _drop_snapshots(self) -> None:
        for snapshot in (None if self._in_flight is None else self._in_flight.snapshot,
                         self._pending, self._in_use):
            if snapshot is not None:
                snapshot.release()
        self._in_flight, self._pending, self._in_use = None, None, None

    def close(self) -> None:
        """Tell the collector the stream ended (best effort) and release the link;
        idempotent."""
        if self._closed:
            return
        self._closed = True
        # Also to a failed link: a collector declared dead may only have been frozen.
        self._control.post_closed(self.collector_id, self.incarnation, self._seq,
                                  self._signal(Update(CLOSED)))
        self._drop_snapshots()
        self._end.close()

    def forget(self, *, close_signal: bool) -> None:
        """After :meth:`close`, once the collector is gone: delete the keys this
        incarnation left in the store (best effort). The close signal stays unless
        ``close_signal``: a collector retired because it froze learns from it, when it
        wakes, that it was; it goes when a newer incarnation of its id is admitted."""
        last = self._seq + 1 if close_signal else self._seq
        self._control.forget_link(self.collector_id, self.incarnation,
                                  range(max(0, self._seq - _KEPT_SIGNALS), last),
                                  self._versions)
