"""Starting the TCPStore server and connecting clients to it.

Reads and writes go through :mod:`weight_sync.control.channel`; this module only makes the
server (bound to exactly the address asked for) and the clients.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from datetime import timedelta
from typing import Any, TypeVar

import torch.distributed as dist

from weight_sync.config import check_timeout
from weight_sync.errors import ClosedError, ConfigError, ConnectionFailed, PeerGone

__all__ = ["StoreServer", "connect_client", "run_bounded", "TooLate", "WILDCARDS", "IN_FLIGHT"]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Addresses that bind every interface, and the loopback address that reaches them.
WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1"}
# connect_client waits this much longer than its timeout for TCPStore's own retries to
# give up on a port where nothing listens.
_CONNECT_MARGIN_S = 0.5


class _InFlight:
    """The blocking C++ calls in progress in this process (store calls, gloo waits),
    for a clean interpreter exit.

    A store call to a learner that was cut off or frozen can stay parked for as long as
    TCP retransmits (minutes), and a gloo receive cut mid-transfer waits for its whole
    timeout (gloo cannot cancel it: ``ProcessGroupGloo.shutdown()`` and ``abort()`` do
    not wake it, measured with torch 2.13), each on a thread the collector gave up on.
    If such a call returns while the interpreter finalizes, CPython (before 3.14) ends
    its thread from inside torch's GIL guard and the process dies with "terminate
    called without an active exception" (SIGABRT; seen on the test bed after a link cut
    and restore). So at exit no new call starts, and the exit waits, at most
    :data:`_EXIT_GRACE_S`, for those in progress. The same holds for freeing a process
    group (its destructor gives up the GIL): closed groups are freed on a thread that
    is not finalized under them (see ``transports.pair``).
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._deadlines: dict[int, float] = {}  # call token -> when it ends by itself
        self._next = 0
        self._exiting = False
        self._releases: list[Callable[[], None]] = []

    @contextlib.contextmanager
    def entered(self, what: str, bound: float | None = None) -> Any:
        """Around one blocking call; ``bound``: the most seconds it can last."""
        with self._cond:
            if self._exiting:
                raise ClosedError(f"{what}: the process is exiting")
            token, self._next = self._next, self._next + 1
            self._deadlines[token] = (time.monotonic() + bound if bound is not None
                                      else float("inf"))
        try:
            yield
        finally:
            with self._cond:
                del self._deadlines[token]
                self._cond.notify_all()

    def after_drain(self, release: Callable[[], None]) -> None:
        """Call ``release`` at exit once the drain is over, on the exiting thread (to
        free C++ objects there rather than on a thread finalization would kill)."""
        with self._cond:
            self._releases.append(release)

    def drain(self, grace: float) -> None:
        """Refuse new calls; wait up to ``grace`` s for those in progress (one that
        returns later, after this process is gone, is harmless; ``grace`` bounds the
        exit of a process whose peer is unreachable); then run the releases."""
        with self._cond:
            self._exiting = True
            if self._deadlines:
                end = time.monotonic() + grace
                log.warning("exiting: waiting up to %.1fs for %d call(s) to an unreachable "
                            "peer (a store call, or a gloo transfer cut mid-way)", grace,
                            len(self._deadlines))
                # a bounded wait ends a little after its own timeout (scheduling)
                end = min(end, max(self._deadlines.values()) + _LATE_S)
                self._cond.wait_for(lambda: not self._deadlines,
                                    max(end - time.monotonic(), 0))
            releases, self._releases = self._releases, []
        for release in releases:
            release()


#: The longest an exiting process waits for calls in progress (atexit).
_EXIT_GRACE_S = 3.0
_LATE_S = 0.5
IN_FLIGHT = _InFlight()
"""Every store call and connect, and every gloo wait, of this process goes through it."""
atexit.register(IN_FLIGHT.drain, _EXIT_GRACE_S)


def _listen(host: str, port: int) -> int:
    """A listening socket bound to exactly ``host:port``; returns its descriptor."""
    family, kind, proto, _, addr = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(socket.SOMAXCONN)
    except OSError:
        sock.close()
        raise
    return sock.detach()


class StoreServer:
    """The learner's store server on ``host:port`` (port 0 = any free port).

    The server listens on ``host`` only: TCPStore on its own binds every interface
    whatever host it is given, so the socket is bound here and handed over. It runs
    until :meth:`stop`; the learner talks to it through clients like everyone else.

    Raises:
        ConnectionFailed: the address cannot be bound (e.g. the port is in use).
    """

    def __init__(self, host: str, port: int, timeout: float) -> None:
        try:
            fd = _listen(host, port)
        except OSError as exc:
            raise ConnectionFailed(f"cannot start the store on {host}:{port}: {exc}") from exc
        self.host = host
        self.port = _bound_port(fd)
        #: The address a client on this host dials (a wildcard is reached via loopback).
        self.local_host = WILDCARDS.get(host, host)
        try:
            # The store owns the descriptor from here on and closes it when it stops
            # (also when it fails to start).
            self._server: dist.TCPStore | None = dist.TCPStore(
                self.local_host, self.port, is_master=True, wait_for_workers=False,
                timeout=timedelta(seconds=timeout), master_listen_fd=fd,
            )
        except (dist.DistError, RuntimeError) as exc:
            raise ConnectionFailed(f"cannot start the store on {host}:{port}: {exc}") from exc

    def stop(self) -> None:
        """Stop serving; idempotent. Clients see the connection drop (``PeerGone``)."""
        # torch stops the server when the master object is destroyed, and this is the
        # only reference to it (clients hold their own objects).
        self._server = None


def _bound_port(fd: int) -> int:
    sock = socket.socket(fileno=fd)
    try:
        return int(sock.getsockname()[1])
    finally:
        sock.detach()


class TooLate(Exception):
    """:func:`run_bounded`'s call did not end in time (it goes on, abandoned)."""


def run_bounded(fn: Callable[[], T], timeout: float, name: str,
                on_late: Callable[[T | None], None] | None = None) -> T:
    """``fn()``, run on a daemon thread and waited for at most ``timeout``: for calls
    that may block without a limit (a TCPStore call to a frozen or cut-off learner
    answers only when it wakes, whatever the client's timeout).

    Args:
        name: the thread's name (after ``weight-sync-``; the caller's follows).
        on_late: if ``fn`` ends after the caller gave up, called on its thread with
            what it returned (``None`` if it raised), to release what it made.

    Raises:
        TooLate: ``fn`` did not end within ``timeout``.
        BaseException: what ``fn`` raised.
    """
    result: Future[T] = Future()
    lock = threading.Lock()
    abandoned = False

    def run() -> None:
        value: T | None = None
        try:
            value = fn()
        except BaseException as exc:
            with lock:
                late = abandoned
                if not late:
                    result.set_exception(exc)
        else:
            with lock:
                late = abandoned
                if not late:
                    result.set_result(value)
        if late and on_late is not None:
            on_late(value)

    caller = threading.current_thread().name
    threading.Thread(target=run, name=f"weight-sync-{name} for {caller}", daemon=True).start()
    try:
        return result.result(timeout)
    except FutureTimeout:
        with lock:
            if not result.done():
                abandoned = True
                raise TooLate(name) from None
        return result.result()  # it ended between the timeout and the lock


def connect_client(host: str, port: int, timeout: float) -> dist.TCPStore:
    """Connect to a running store, retrying until ``timeout`` seconds.

    The connection is made on a daemon thread waited for at most ``timeout`` (plus
    :data:`_CONNECT_MARGIN_S`): TCPStore's own check of a new connection waits without
    a limit for an endpoint that accepts it and never answers (a frozen learner, some
    other server). Such a thread ends when that endpoint answers or closes; a client it
    makes after the caller gave up is dropped.

    Raises:
        ConnectionFailed: no store answered at ``host:port`` within ``timeout``;
            :class:`PeerGone` (a kind of it) for an endpoint that accepted the
            connection and stayed silent (a frozen learner).
        ConfigError: ``port`` is not in ``1..65535``, or ``timeout`` is not a positive
            finite number.
    """
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port <= 65535:
        raise ConfigError(f"store port must be an int in [1, 65535], got {port!r}")
    timeout = check_timeout(f"connecting to the store at {host}:{port}", timeout, zero=False)
    start = time.monotonic()

    def build() -> dist.TCPStore:
        with IN_FLIGHT.entered(f"connecting to {host}:{port}"):
            return dist.TCPStore(host, port, is_master=False,
                                 timeout=timedelta(seconds=timeout))

    try:
        return run_bounded(build, timeout + _CONNECT_MARGIN_S, f"connect-{host}:{port}")
    except TooLate:
        raise PeerGone(
            f"the endpoint at {host}:{port} accepted a connection but did not answer as a "
            f"weight-sync store within {time.monotonic() - start:.1f}s (timeout "
            f"{timeout}s): its process is frozen, or it is not a store") from None
    except (dist.DistError, RuntimeError) as exc:
        raise ConnectionFailed(
            f"no weight-sync store reachable at {host}:{port} after "
            f"{time.monotonic() - start:.1f}s: {exc}"
        ) from exc
