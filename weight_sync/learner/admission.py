"""The learner's door: admitting collectors at ``connect()`` and when they (re)join.

A collector joins by bumping its ``join/<cid>`` counter (its incarnation) and writing
its hello (:mod:`weight_sync.handshake`). :class:`Admissions` judges each incarnation
by the handshake's rules, builds the link with the chosen transport, and connects the
transport ends: in the caller's thread at the initial ``connect()``, in a background
thread for run-time joins, since a rendezvous blocks until the collector builds its end,
and a collector that dies halfway through its handshake must cost the learner's
``send_weights_async``/``wait_ack`` nothing.

After ``connect()``, run-time joins are looked for by a :class:`Door`: a thread of the
learner's own, so a collector is admitted (or refused) and caught up while the learner
trains, evaluates or sleeps, not only when it calls in.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future

from weight_sync.control.channel import Control
from weight_sync.errors import ProtocolError, WeightSyncError
from weight_sync.handshake import Reserve, judge, refusal_error
from weight_sync.learner.sender_link import SenderLink
from weight_sync.transports.base import Offer
from weight_sync.transports.registry import TransportSpec
from weight_sync.wire.auth import StreamKey
from weight_sync.wire.protocol import REFUSED_DUPLICATE, REFUSED_PROTOCOL, Hello, Verdict

__all__ = ["Admissions", "Door"]

# How long an incarnation that said no hello yet, while a newer one of its id did, is
# looked for (its process took the number, then was slower than the next one): it
# gets a verdict when its hello comes, instead of waiting out its join timeout.
_LATE_HELLO_S = 120.0

log = logging.getLogger(__name__)

#: Builds an unconnected link: ``(collector id, incarnation, hello, transport spec,
#: proven to share the learner's host)``.
LinkFactory = Callable[[int, int, Hello, TransportSpec, bool], SenderLink]


class Admissions:
    """Judges joining collectors and connects their links.

    Args:
        control: the learner's main-thread store client.
        make_link: builds an unconnected link.
        chain: the proposed transport and its fallbacks.
        offers: the learner's transport offers, by name.
        max_collectors: ids ``0..max_collectors-1`` are looked at.
        connect_control: makes a new store client, for a background thread.
        key: with a shared secret, the stream's key (hellos must prove it, verdicts
            are signed with it).
        reserve: asked before a collector is placed on a transport
            (:data:`~weight_sync.handshake.Reserve`).
    """

    def __init__(self, control: Control, make_link: LinkFactory, chain: list[TransportSpec],
                 offers: Mapping[str, Offer], max_collectors: int,
                 connect_control: Callable[[], Control], key: StreamKey | None = None,
                 reserve: Reserve | None = None) -> None:
        self._key = key
        self._reserve = reserve
        self._control = control
        self._make_link = make_link
        self._chain = chain
        self._offers = offers
        self._max = max_collectors
        self._connect_control = connect_control
        self.seen: dict[int, int] = {}
        """Newest incarnation judged, per collector id."""
        self._refused: dict[int, tuple[int, WeightSyncError]] = {}  # id -> (inc, why)
        self._joins_seen = 0
        self._late: dict[tuple[int, int], float] = {}  # (id, incarnation) -> since when
        self._malformed: set[tuple[int, int]] = set()  # hellos that were not hellos
        self._attempts: list[tuple[SenderLink, Future[None]]] = []  # links connecting

    # -- judging -----------------------------------------------------------------------
    def _judge(self, cid: int, inc: int, hello: Hello, current: SenderLink | None,
               peers: Sequence[Hello] = ()) -> SenderLink | None:
        """Judge one incarnation (``peers``: the hellos judged together with it) and
        write the verdict; its link if admitted."""
        self.seen[cid] = inc  # never judged again: a replayed hello admits nobody
        self._control.forget_hello(cid, inc)
        verdict = judge(hello, cid, inc, current, self._chain, self._offers, self._key,
                        self._reserve, peers)
        if not verdict.admitted:
            who = f"collector {cid} (pid {hello.pid})"
            self._refused[cid] = (inc, refusal_error(verdict, who, hello.refused))
            log.warning("refused %s, incarnation %d: %s", who, inc, verdict.reason)
            if not hello.refused:  # one that listed layout differences waits for none
                self._control.admit(cid, inc, self._signed(cid, inc, hello, verdict))
            return None
        spec = next(s for s in self._chain if s.name == verdict.transport)
        link = self._make_link(cid, inc, hello, spec, verdict.local)
        self._refused.pop(cid, None)
        self._control.admit(cid, inc, self._signed(cid, inc, hello, verdict))
        log.info("admitting collector %d (incarnation %d, pid %d on %s) over %r: %s", cid,
                 inc, hello.pid, hello.host, spec.name, verdict.reason)
        return link

    def _hello(self, cid: int, inc: int) -> Hello | None:
        """Collector ``cid``'s hello for incarnation ``inc``, if it said one. A value
        that is no hello (a foreign process writing to the store, a bug) is refused and
        dropped, never fatal to the door: the id stays open to a real collector."""
        try:
            return self._control.hello(cid, inc)
        except ProtocolError as exc:
            if (cid, inc) not in self._malformed:
                self._malformed.add((cid, inc))
                self.seen[cid] = max(self.seen.get(cid, 0), inc)
                log.warning("collector %d, incarnation %d: %s; refused and dropped", cid,
                            inc, exc)
                self._control.forget_hello(cid, inc)
                self._control.admit(cid, inc, Verdict(refusal=REFUSED_PROTOCOL,
                                                      reason=f"malformed hello: {exc}"))
            return None

    def _signed(self, cid: int, inc: int, hello: Hello, verdict: Verdict) -> Verdict:
        if self._key is None:
            return verdict
        return dataclasses.replace(
            verdict, proof=self._key.verdict_proof(cid, inc, hello.nonce, verdict))

    def initial(self, ids: Iterable[int], timeout: float) -> dict[int, SenderLink]:
        """The initial ``connect()``: wait for collectors ``ids``, judge every
        incarnation each has claimed (in order: a live earlier one wins over a
        duplicate), and connect the admitted links in this thread.

        Raises:
            WeightSyncTimeout: naming the collectors that did not join in time.
            LayoutMismatchError, DuplicateCollectorError: a collector was refused and
                none of its incarnations admitted.
        """
        deadline = time.monotonic() + timeout
        ids = list(ids)
        self._control.wait_joined(ids, timeout)
        newest = {c: self._control.incarnation(c) for c in ids}
        self._control.wait_hellos(newest.items(), deadline - time.monotonic(),
                                  "collectors to finish their handshake")
        links: dict[int, SenderLink] = {}
        batch = {c: h for c in ids if (h := self._control.hello(c, newest[c])) is not None}
        for cid in ids:
            peers = [h for c, h in batch.items() if c != cid]
            for inc in range(1, newest[cid] + 1):
                hello = self._hello(cid, inc)
                if hello is None:  # an earlier incarnation that never said hello
                    continue
                link = self._judge(cid, inc, hello, links.get(cid), peers)
                if link is not None:
                    superseded = links.pop(cid, None)  # its process is gone
                    if superseded is not None:
                        superseded.close()
                    links[cid] = link
            if cid not in links:
                for link in links.values():
                    link.close()
                raise self._refused[cid][1]
        # _joins_seen stays as it was: the first poll() then looks at every id once, so
        # an elastic id that joined during this connect() is judged too (the joins
        # counter would not move for it again).
        try:
            for link in links.values():
                link.connect(self._control, deadline - time.monotonic())
        except BaseException:
            for link in links.values():
                link.close()
            raise
        return links

    def refusal(self, cid: int) -> WeightSyncError | None:
        """Why collector ``cid`` was refused, if its newest incarnation was (and no
        newer process has claimed the id since)."""
        entry = self._refused.get(cid)
        if entry is None or cid in self.connecting:
            return None
        inc, error = entry
        return error if self._control.incarnation(cid) == inc else None

    # -- run-time joins ----------------------------------------------------------------
    @property
    def connecting(self) -> list[int]:
        """Ids whose new link is still being connected."""
        return sorted({link.collector_id for link, _ in self._attempts})

    def poll(self, live: Mapping[int, SenderLink]) -> tuple[list[SenderLink], dict[int, str]]:
        """Look for joins once; start connecting the admissible ones.

        Args:
            live: the learner's current links (for the duplicate check).

        Returns:
            The links connected since the last call (to be installed by the caller,
            replacing any older link of the same id), and the ids whose connect
            failed, with why.
        """
        self._look(live)
        ready: list[SenderLink] = []
        failed: dict[int, str] = {}
        for attempt in [a for a in self._attempts if a[1].done()]:
            self._attempts.remove(attempt)
            link, future = attempt
            exc = future.exception()
            if link.incarnation < self.seen.get(link.collector_id, 0):
                link.close()  # a newer incarnation joined meanwhile
            elif exc is None:
                ready.append(link)
            else:
                link.close()
                failed[link.collector_id] = (
                    f"collector {link.collector_id} (incarnation {link.incarnation}) never "
                    f"finished connecting: {exc}")
                log.warning("%s", failed[link.collector_id])
        return ready, failed

    def _look(self, live: Mapping[int, SenderLink]) -> None:
        self._answer_late()
        joins = self._control.joins()
        if joins == self._joins_seen:
            return
        handshaking = False
        for cid in range(self._max):
            newest = self._control.incarnation(cid)
            current = live.get(cid)
            for inc in range(self.seen.get(cid, 0) + 1, newest + 1):
                hello = self._hello(cid, inc)
                if hello is None:
                    if (cid, inc) in self._malformed:
                        continue
                    if inc == newest:
                        handshaking = True  # look again on a later call
                    else:  # superseded before its hello: answered when it comes
                        self._late[(cid, inc)] = time.monotonic()
                    continue
                link = self._judge(cid, inc, hello, current)
                if link is not None:
                    current = link
                    self._connect_in_background(link)
        if not handshaking:
            self._joins_seen = joins

    def _answer_late(self) -> None:
        """Refuse the late incarnations whose hello came: as any other would be, or, if
        it would be admitted, as superseded by the newer one already judged."""
        for (cid, inc), since in list(self._late.items()):
            hello = self._hello(cid, inc)
            if hello is None:
                if time.monotonic() - since > _LATE_HELLO_S:
                    del self._late[(cid, inc)]  # it never will
                continue
            del self._late[(cid, inc)]
            self._control.forget_hello(cid, inc)
            verdict = judge(hello, cid, inc, None, self._chain, self._offers, self._key)
            if verdict.admitted:
                verdict = Verdict(refusal=REFUSED_DUPLICATE,
                                  reason=f"collector {cid}: incarnation {inc} said hello after "
                                         f"incarnation {self.seen.get(cid, 0)} of its id "
                                         f"joined")
            log.warning("refused collector %d (pid %d), late incarnation %d: %s", cid,
                        hello.pid, inc, verdict.reason)
            if not hello.refused:
                self._control.admit(cid, inc, self._signed(cid, inc, hello, verdict))

    def _connect_in_background(self, link: SenderLink) -> None:
        future: Future[None] = Future()
        # A daemon thread, not an executor: a rendezvous with a collector that died
        # must not hold up the learner's exit for the link's timeout.
        threading.Thread(target=self._connect, args=(link, future), daemon=True,
                         name=f"weight-sync-admit-{link.collector_id}-{link.incarnation}"
                         ).start()
        self._attempts.append((link, future))

    def _connect(self, link: SenderLink, future: Future[None]) -> None:
        """In a background thread: the rendezvous, on the thread's own store client."""
        start = time.monotonic()
        try:
            link.connect(self._connect_control(), link.spec.timeout)
        except BaseException as exc:
            future.set_exception(exc)
            return
        log.info("collector %d (incarnation %d) connected in %.2fs", link.collector_id,
                 link.incarnation, time.monotonic() - start)
        future.set_result(None)

    def close(self) -> None:
        """Stop admitting: links still connecting are closed (their threads end with
        their rendezvous timeout)."""
        for link, _future in self._attempts:
            link.close()
        self._attempts.clear()


class Door:
    """The learner's always-open door: runs ``step`` (look for joins, judge them,
    install and catch up the links connected since) every ``period`` s on a daemon
    thread of its own, whatever the learner's caller is doing, until :meth:`close`.

    Args:
        step: one round; it takes the learner's lock itself, and uses a store client
            only under that lock (or the thread's own).
        period: seconds between rounds.

    A round that raises stops the door: the error is kept in :attr:`failure` (and
    logged) for the learner's next call to raise.
    """

    def __init__(self, step: Callable[[], None], period: float) -> None:
        self._step = step
        self._period = period
        self._stop = threading.Event()
        self.failure: BaseException | None = None
        """What stopped the door, if a round raised."""
        self._thread = threading.Thread(target=self._run, name="weight-sync-door",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._period):
            try:
                self._step()
            except BaseException as exc:
                if not self._stop.is_set():  # not the learner closing under it
                    log.exception("the learner's admission thread stopped")
                    self.failure = exc
                return

    def close(self, timeout: float) -> None:
        """Stop after the round in progress (waiting up to ``timeout`` s); idempotent."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)


def is_local(hello: Hello) -> bool:
    """Whether the collector that said ``hello`` runs on this host (by name)."""
    return hello.host == socket.gethostname()
