"""The learner's door: collectors that join or rejoin while the learner runs.

A collector joins by bumping its ``join/<cid>`` counter (its incarnation) and the
``joins`` counter, then writing its ``hello``. :class:`Admissions` notices the
``joins`` counter move (one store read per look), refuses duplicates and layout
mismatches, and builds the learner's end of each new link in a background thread:
the pair-group rendezvous blocks until the collector builds its end, and a
collector that dies halfway through its handshake must cost the learner's
``send_weights_async``/``wait_ack`` nothing.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future
from concurrent.futures import wait as wait_futures
from typing import Any

import torch.distributed as dist

from weight_sync.protocol import ADMITTED, ADMITTED_SHM, Keys
from weight_sync.store import connect_client
from weight_sync.transports.sender_link import SenderLink

__all__ = ["Admissions"]

log = logging.getLogger(__name__)

LinkFactory = Callable[[int, int, dict[str, Any]], SenderLink]


class Admissions:
    """Finds (re)joined collectors and connects their links off the learner's thread.

    Args:
        store: the learner's store client (used from the learner's thread only).
        keys: the stream's key names.
        make_link: builds an unconnected link from ``(collector_id, incarnation, hello)``.
        max_collectors: ids ``0..max_collectors-1`` are looked at.
        address: ``(host, port)`` of the store, for the background thread's own client.
        timeout: bound on that client's connect.
    """

    def __init__(self, store: dist.Store, keys: Keys, make_link: LinkFactory,
                 max_collectors: int, address: tuple[str, int], timeout: float) -> None:
        self._store = store
        self._keys = keys
        self._make_link = make_link
        self._max = max_collectors
        self._address = address
        self._timeout = timeout
        self.seen: dict[int, int] = {}
        """Newest incarnation handled, per collector id."""
        self._joins_seen = 0
        self._attempts: list[tuple[SenderLink, Future[None]]] = []  # links connecting

    def hello(self, cid: int, inc: int) -> dict[str, Any]:
        """The handshake a collector incarnation wrote (pid, host, refusal)."""
        return dict(json.loads(self._store.get(self._keys.hello(cid, inc))))

    def admit_now(self, cid: int, inc: int, hello: dict[str, Any],
                  timeout: float) -> SenderLink:
        """Admit and connect in this thread, within ``timeout`` s (the initial connect
        of collectors 0..N-1)."""
        link = self._admit(cid, inc, hello)
        link.connect(timeout=timeout)
        return link

    def _admit(self, cid: int, inc: int, hello: dict[str, Any]) -> SenderLink:
        link = self._make_link(cid, inc, hello)
        self.seen[cid] = inc
        self._store.set(self._keys.admit(cid, inc),
                        ADMITTED_SHM if link.shared_memory else ADMITTED)
        return link

    @property
    def connecting(self) -> list[int]:
        """Ids whose new link is still being connected."""
        return sorted({link.collector_id for link, _ in self._attempts})

    def poll(self, live: dict[int, SenderLink]) -> tuple[list[SenderLink], dict[int, str]]:
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

    def wait(self, ids: Iterable[int], timeout: float) -> None:
        """Block up to ``timeout`` s until one of the connects of ``ids`` in progress
        ends."""
        wanted = set(ids)
        futures = [f for link, f in self._attempts if link.collector_id in wanted]
        if futures:
            wait_futures(futures, timeout, return_when=FIRST_COMPLETED)

    def _look(self, live: dict[int, SenderLink]) -> None:
        joins = int(self._store.add(self._keys.joins, 0))
        if joins == self._joins_seen:
            return
        handshaking = False
        for cid in range(self._max):
            inc = int(self._store.add(self._keys.join(cid), 0))
            if inc <= self.seen.get(cid, 0):
                continue
            if not self._store.check([self._keys.hello(cid, inc)]):
                handshaking = True  # look again on a later call
                continue
            self._consider(cid, inc, self.hello(cid, inc), live.get(cid))
        if not handshaking:
            self._joins_seen = joins

    def _consider(self, cid: int, inc: int, hello: dict[str, Any],
                  current: SenderLink | None) -> None:
        if hello.get("refused"):
            self.seen[cid] = inc
            log.warning("collector %d (incarnation %d) refused the layout", cid, inc)
            return
        if (current is not None and current.failure is None and current.peer_pid is not None
                and current.peer_alive()):
            self.seen[cid] = inc
            reason = (f"duplicate collector id {cid}: incarnation {current.incarnation} "
                      f"(pid {current.peer_pid}) is alive and served")
            self._store.set(self._keys.admit(cid, inc), reason)
            log.warning("refused collector %d incarnation %d: %s", cid, inc, reason)
            return
        log.info("admitting collector %d (incarnation %d)", cid, inc)
        link = self._admit(cid, inc, hello)
        future: Future[None] = Future()
        # A daemon thread, not an executor: a rendezvous with a collector that died
        # must not hold up the learner's exit for the link's timeout.
        threading.Thread(target=self._connect, args=(link, future), daemon=True,
                         name=f"weight-sync-admit-{cid}-{inc}").start()
        self._attempts.append((link, future))

    def _connect(self, link: SenderLink, future: Future[None]) -> None:
        """In a background thread: the rendezvous, on the thread's own store client."""
        start = time.monotonic()
        try:
            host, port = self._address
            link.connect(store=connect_client(host, port, self._timeout))
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
        self._store = None  # type: ignore[assignment]  # the server stops with its last reference
