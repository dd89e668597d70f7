"""A collector's end of its link: :class:`ReceiverLink`.

Waits for the learner's signal of the next message, has the transport end (any
:class:`~weight_sync.transports.base.ReceiverTransport`) fill a flat buffer, and checks
the message before it is handed over, the same for every transport: with a shared
secret, the signal's HMAC before anything is received (a forged or replayed signal
ends the stream) and the message's BLAKE3 digest after; the header against the signalled
version; without a secret, the payload against the header's checksum (except a lent,
zero-copy message, the learner's own memory, and a message to a collector the learner
proved shares its host: memory to memory through one kernel, nothing crossed a wire). A message that
fails its digest or checksum is refused and asked for again (the learner sends its
version again as the next message), at most ``MAX_RESENDS`` times in a row.

A transport end that streams (:class:`~weight_sync.transports.base.StreamingReceiver`)
reports each piece as it lands: the link hashes it then, while the next piece arrives,
so checking the checksum costs nothing after the last byte. It stops hashing ahead
once the learner's headers show it sends no checksum.

A transport end that can post a receive early
(:class:`~weight_sync.transports.base.EarlyReceiver`, small gloo messages) gets the next
message's receive posted before the link waits for its signal, so its bytes flow as
soon as the learner sends them: not on a stream that may carry changed-only messages
(their size is only known from the signal), nor with a ``before_receive`` hook (it runs
before the bytes land).

A changed-only message (the signal names its changed leaves) is received into a buffer
of the link's own and composed with the held message into the whole one before any
of these checks (:mod:`weight_sync.wire.delta`), so the checks cover what is applied.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from weight_sync.collector.hooks import ReceiverHooks
from weight_sync.control.channel import Control
from weight_sync.errors import AuthenticationError, ClosedError, IntegrityError, ProtocolError
from weight_sync.transports.base import (
    EarlyReceiver,
    LinkSpec,
    ReceiverTransport,
    StreamingReceiver,
)
from weight_sync.wire import hashing
from weight_sync.wire.auth import StreamKey, message_digest
from weight_sync.wire.delta import DeltaSpec, compose
from weight_sync.wire.layout import HEADER_BYTES
from weight_sync.wire.packing import check_payload, header_checksum, host_bytes, read_header
from weight_sync.wire.protocol import CLOSED, MAX_RESENDS, Update

__all__ = ["ReceiverLink"]

log = logging.getLogger(__name__)


class ReceiverLink:
    """Receives the learner's messages into flat buffers (collector side).

    Args:
        spec: the link.
        end: the transport's collector end.
        listener: the store client of the thread that calls :meth:`receive` and
            :meth:`ack`.
        acker: the store client of the thread that calls :meth:`stop` and :meth:`close`
            (a TCPStore client must not be shared between threads).
        hooks: fault-injection and instrumentation hooks.
        lends: the transport lends its messages (zero-copy) instead of filling buffers.
        key: with a shared secret, the stream's key: only signals it authenticates are
            acted on.
        changed_only: the learner may send changed-only messages.
        local: the learner proved this collector shares its host: no payload
            checksum is checked (a secret's digest still is).
    """

    def __init__(self, spec: LinkSpec, end: ReceiverTransport, listener: Control,
                 acker: Control, hooks: ReceiverHooks | None = None, *,
                 lends: bool = False, key: StreamKey | None = None,
                 changed_only: bool = False, streams: bool = False,
                 posts_early: bool = False, local: bool = False) -> None:
        self.spec = spec
        self._key = key
        self._refusals = 0  # messages refused in a row (failed digest or checksum)
        self.refused = 0
        """Messages refused so far as corrupted (each asked for again)."""
        self.lends = lends
        self.local = local
        self.collector_id = spec.collector_id
        self.incarnation = spec.incarnation
        self._end = end
        self._streaming = end if streams and isinstance(end, StreamingReceiver) else None
        # Hash streamed pieces as they land: not when a hook may still change the
        # message after it landed, nor once the learner is seen to send no checksum.
        self._hash_ahead = (key is None and not local
                            and (hooks is None or hooks.after_receive is None))
        self._early = (end if posts_early and isinstance(end, EarlyReceiver)
                       and not lends and not changed_only
                       and (hooks is None or hooks.before_receive is None) else None)
        self._listener = listener
        self._acker = acker
        self._hooks = hooks or ReceiverHooks()
        self._seq = 0  # next message number
        self._spent: list[tuple[int, int | None]] = []  # (seq, previous version) to delete
        self._last_version: int | None = None
        self._delta_buffer: torch.Tensor | None = None  # made on the first delta
        self._stopped = False
        self._closed = False

    def connect(self, timeout: float) -> None:
        """Rendezvous of the transport ends (bounded)."""
        if self._hooks.before_connect is not None:
            self._hooks.before_connect(self.collector_id, self.incarnation)
        self._end.connect(self._listener.link(self.collector_id, self.incarnation), timeout)

    def receive(self, buffer: torch.Tensor | None, timeout: float,
                held: torch.Tensor | None = None) -> tuple[int, torch.Tensor] | None:
        """Receive the next message if the learner signals one within ``timeout``
        (``0`` polls): its version and the tensor holding it (``buffer``, filled, or the
        transport's own when it lends; ``buffer`` is ``None`` then), or ``None`` (also
        when the message was refused as corrupted and asked for again).

        ``held`` is the message of the version last received (the one applied), what a
        changed-only message is composed with; ``buffer`` may be that same tensor (a
        collector that copies messages into its policy): then only the changed leaves
        are written into it.

        The acknowledgement is separate (:meth:`ack`), sent once the weights are used.

        Raises:
            ClosedError: the learner closed the stream (or this link was closed).
            PeerGone: the learner's process or store went away, or a transfer was cut
                short (``buffer`` then holds garbage: do not apply it).
            ProtocolError: a message whose header is not ours or names another
                version (torn or foreign).
            AuthenticationError: with a secret, a signal without a valid HMAC (forged,
                or replayed from another message).
            IntegrityError: ``MAX_RESENDS`` messages in a row failed their digest or
                checksum.
        """
        cid, inc = self.collector_id, self.incarnation
        if self._early is not None and buffer is not None:
            self._early.post(buffer)
        update = self._listener.next_update(cid, inc, self._seq, timeout)
        if update is None:
            return None
        if self._key is not None and not self._key.authentic(cid, inc, self._seq, update):
            log.error("%s: message %d's signal %r is not authenticated (forged or "
                      "replayed): refused, nothing applied", self.spec.who(), self._seq,
                      update.encode()[:80])
            raise AuthenticationError(f"{self.spec.who()}: message {self._seq}'s signal is not "
                                      f"authenticated (forged or replayed); refused, nothing "
                                      f"applied")
        if update.closed:
            self._closed_by_learner()
        running: hashing.Checksum | None = None
        if update.delta:
            data = self._receive_delta(update, buffer, held)
        else:
            target = None if self.lends else buffer
            if self._hooks.before_receive is not None:
                self._hooks.before_receive(update.version, target)
            if self._streaming is not None and target is not None:
                if self._hash_ahead:
                    running = hashing.Checksum(hashing.checksum_kind())
                data = self._streaming.receive(update.note, target, self.spec.timeout,
                                               self._landed(update.version, target, running))
            else:
                data = self._end.receive(update.note, target, self.spec.timeout)
        if data is None:
            return None
        if self._hooks.after_receive is not None:
            self._hooks.after_receive(update.version, data)
        got = read_header(data, self.spec.layout)
        if got != update.version:
            raise ProtocolError(f"{self.spec.who()}: message announced as version "
                                f"{update.version} carries version {got}")
        try:
            self._check(data, update, running)
        except IntegrityError as exc:
            self._refuse(exc)
            return None
        self._refusals = 0
        # The learner sent this message after reading the previous one's ack: both
        # keys are spent. Deleted by collect_garbage(), off the latency path.
        self._spent.append((self._seq, self._last_version))
        self._last_version = update.version
        self._seq += 1
        return update.version, data

    def _closed_by_learner(self) -> None:
        """The learner closed the stream: say goodbye and raise ``ClosedError``."""
        self._listener.bye(self.collector_id, self.incarnation)  # its store waits for it
        # Nothing more to tell it: stop() and close() make no store call (its store
        # may be gone by then, and c10d logs each failed call with a stack trace).
        self._stopped = True
        raise ClosedError(f"{self.spec.who()}: the weight stream was closed")

    def check_closed(self) -> None:
        """Non-blocking, while the message received last waits for its apply: raise
        ``ClosedError`` (after saying goodbye) if the learner's next signal closes the
        stream. The learner keeps its store up only briefly for that goodbye; a
        collector that applies slowly would otherwise find the store gone instead.

        Raises:
            ClosedError: the learner closed the stream.
        """
        cid, inc = self.collector_id, self.incarnation
        update = self._listener.next_update(cid, inc, self._seq, 0)
        if update is None or not update.closed:
            return  # a next version's signal is read by receive(), as any other
        if self._key is not None and not self._key.authentic(cid, inc, self._seq, update):
            return  # receive() refuses it, loudly
        self._closed_by_learner()

    def _receive_delta(self, update: Update, buffer: torch.Tensor | None,
                       held: torch.Tensor | None) -> torch.Tensor | None:
        """Receive a changed-only message and compose the whole one into ``buffer``;
        ``None`` if it was refused (not against the version held): asked for again."""
        layout = self.spec.layout
        spec = DeltaSpec.decode(update.delta, len(layout.entries))
        if self._delta_buffer is None:
            self._delta_buffer = torch.empty(layout.nbytes, dtype=torch.uint8,
                                             device=self.spec.device)
        part = self._delta_buffer[:spec.nbytes(layout)]
        if self._hooks.before_receive is not None:
            self._hooks.before_receive(update.version, part)
        # Received even when it will be refused: the learner's send is posted and waits.
        part = self._end.receive(update.note, part, self.spec.timeout)
        if buffer is None or held is None or spec.base != self._last_version:
            self._refuse(IntegrityError(
                f"{self.spec.who()}: version {update.version} came as changes against "
                f"version {spec.base}, but this collector holds {self._last_version}"))
            return None
        compose(part, spec, held, buffer, layout)
        return buffer

    def _landed(self, version: int, data: torch.Tensor, running: hashing.Checksum | None
                ) -> Callable[[int, int], None]:
        """What a streaming end calls as each span of ``data`` lands: hash it into
        ``running`` (payload spans land in order), then the ``during_receive`` hook."""
        got = 0
        hook = self._hooks.during_receive

        def landed(start: int, end: int) -> None:
            nonlocal got
            if running is not None and end > HEADER_BYTES:  # the payload's part
                running.update(host_bytes(data[max(start, HEADER_BYTES):end]))
            got += end - start
            if hook is not None:
                hook(version, got)

        return landed

    def _check(self, data: torch.Tensor, update: Update,
               running: hashing.Checksum | None = None) -> None:
        """Raise ``IntegrityError`` unless the message is the one its signal announced
        (with a secret) or matches its header's checksum (without; ``running``: the
        payload already hashed as it landed). A lent message (zero-copy) is the
        learner's memory, read in place: without a secret there is no transit to check,
        and hashing it would cost each collector a pass over the weights."""
        if self._key is None:
            if self.lends or self.local:  # nothing crossed a wire to corrupt it
                return
            kind, _ = header_checksum(data)
            if kind == hashing.NO_CHECKSUM:
                self._hash_ahead = False  # the learner sends none: stop hashing ahead
            computed = running.value() if running is not None and running.kind == kind else None
            check_payload(data, self.spec.who(), computed)
        elif message_digest(data, like=update.digest) != update.digest:
            raise IntegrityError(f"{self.spec.who()}: version {update.version}'s digest "
                                 f"does not match its signal (corrupted in transit)")

    def _refuse(self, exc: IntegrityError) -> None:
        """Refuse the current message and ask the learner for its version again."""
        self._refusals += 1
        self.refused += 1
        if self._refusals > MAX_RESENDS:
            raise IntegrityError(f"{exc} ({self._refusals} messages in a row; giving up)"
                                 ) from exc
        log.warning("%s; refused, nothing applied, asking for it again", exc)
        self._listener.ask_resend(self.collector_id, self.incarnation, self._seq)
        self._spent.append((self._seq, None))
        self._seq += 1

    def collect_garbage(self) -> None:
        """Delete the store keys of messages already received and acked (listener)."""
        while self._spent:
            seq, version = self._spent.pop()
            self._listener.forget(self.collector_id, self.incarnation, seq, version)

    def ack(self, version: int) -> None:
        """Tell the learner ``version`` is applied (listener: the thread that calls
        :meth:`receive`, never the collector's own, which a store call to a frozen
        learner would hold up).

        Raises:
            PeerGone: the learner's store is gone.
        """
        self._listener.ack(self.collector_id, self.incarnation, version)

    def stop(self, *, reach_learner: bool = True) -> None:
        """Tell the learner this collector leaves, and wake a :meth:`receive` waiting
        for the next message (it raises ``ClosedError``); idempotent.

        Args:
            reach_learner: ``False`` once the learner is known gone or frozen: a store
                call to a frozen learner never returns, so none is made.
        """
        if self._stopped:
            return
        self._stopped = True
        if not reach_learner:
            return
        self._acker.leave(self.collector_id, self.incarnation)
        closed = Update(CLOSED)
        if self._key is not None:
            closed = self._key.sign(self.collector_id, self.incarnation, self._seq, closed)
        self._acker.post_closed(self.collector_id, self.incarnation, self._seq, closed)

    def close(self, *, reach_learner: bool = True) -> None:
        """:meth:`stop`, then release the transport end and the store clients;
        idempotent. Call it once no thread uses the link's messages any more."""
        if self._closed:
            return
        self._closed = True
        self.stop(reach_learner=reach_learner)
        self._end.close()
        # The listener may still be inside a call on its client: the client's socket
        # closes when that call returns.
        self._listener.close()
        self._acker.close()
