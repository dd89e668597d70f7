"""The collector's end of a remote connection: ``python -m weight_sync.collectors.remote`` (its
:func:`main`), :func:`connect` and the channel that carries its batches to the learner's
:class:`~weight_sync.collectors.remote.NetworkLauncher`, and its credits and stop signal back."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import pickle
import socket
import threading
import time
from multiprocessing import AuthenticationError
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge

from weight_sync.collectors.batch_messages import decode_header
from weight_sync.collectors.errors import CollectorRefused, CollectorTimeout
from weight_sync.collectors.remote_connection import (
    ADDRESS_ENV,
    CREDIT,
    KEY_ENV,
    STOP,
    framed,
    shared_key,
    unbounded,
)
from weight_sync.collectors.worker import ThreadCredits, WorkerSpec, run_worker

__all__ = ["connect", "main"]

log = logging.getLogger(__name__)

# Pause between two attempts to reach a restarted learner (bounded by the reattach
# timeout); the same pause connect() makes while nothing listens.
_RETRY_S = 0.2


class _Channel:
    """The collector's end of its connection to the learner's launcher: the sink of its
    messages (:class:`~weight_sync.collectors.worker.MessageSink`), its credits and its stop signal.

    Without ``reattach_timeout``, the connection ending stops the worker. With it, a
    connection that ends without a stop signal (the learner died) is replaced: the
    channel connects to the same address again (bounded by ``reattach_timeout``), says
    the worker's hello again (its first message) and takes the new learner's credits;
    messages sent meanwhile are dropped with the learner they were for. If no learner
    answers in time, :attr:`failed` says why and the worker is stopped.
    """

    def __init__(self, address: tuple[str, int], worker_id: int, conn: Connection,
                 max_inflight: int, *, authkey: bytes | None = None,
                 reattach_timeout: float = 0.0) -> None:
        self.stop = threading.Event()
        self.failed = ""
        self._address, self._worker_id, self._authkey = address, worker_id, authkey
        self._reattach_timeout = reattach_timeout
        self._lock = threading.Lock()
        self._conn: Connection | None = conn
        self._credits = ThreadCredits(max_inflight)
        self._hello: bytes | None = None
        self._closed = False
        self._read_from(conn, self._credits)

    def _read_from(self, conn: Connection, credits: ThreadCredits) -> None:
        threading.Thread(target=self._read, args=(conn, credits), daemon=True,
                         name="weight-sync-remote-control").start()

    def _read(self, conn: Connection, credits: ThreadCredits) -> None:
        try:
            while True:
                what = conn.recv_bytes()
                if what == CREDIT:
                    credits.release()
                elif what == STOP:
                    self.stop.set()
        except (EOFError, OSError):
            if self._reattach_timeout > 0 and not self.stop.is_set():
                self._lost(conn)
            else:
                self.stop.set()  # the learner went away: stop after this step

    def acquire(self, block: bool = True, timeout: float | None = None) -> bool:
        """Take a credit of the learner connected now."""
        return self._credits.acquire(block, timeout)

    def send_bytes(self, buf: bytes | bytearray) -> None:
        header = decode_header(buf)
        if header["kind"] == "error":  # logged here too: a cut-off learner never reads it
            log.error("collector %d failed: %s\n%s", self._worker_id, header.get("error"),
                      header.get("traceback", ""))
        with self._lock:
            conn = self._conn
            if self._hello is None:
                self._hello = bytes(buf)
        if conn is None:  # between two learners
            log.debug("collector %d: a message dropped (no learner connected)",
                      self._worker_id)
            return
        try:
            conn.send_bytes(buf)
        except OSError:
            if self._reattach_timeout <= 0:
                raise
            self._lost(conn)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def _lost(self, conn: Connection) -> None:
        """``conn``'s learner is gone: connect to the next one in the background."""
        with self._lock:
            if self._conn is not conn or self._closed:
                return  # already replaced, or closing
            self._conn = None
        with contextlib.suppress(OSError):
            conn.close()
        log.warning("collector %d: lost the learner at %s:%d; waiting up to %.1fs for a "
                    "new one", self._worker_id, *self._address, self._reattach_timeout)
        threading.Thread(target=self._reconnect, daemon=True,
                         name="weight-sync-remote-reconnect").start()

    def _reconnect(self) -> None:
        deadline = time.monotonic() + self._reattach_timeout
        try:
            while True:
                try:
                    conn, _, max_inflight = connect(
                        self._address, self._worker_id, authkey=self._authkey,
                        timeout=max(deadline - time.monotonic(), 0.1))
                    break
                except (CollectorRefused, CollectorTimeout):
                    # E.g. the new learner's group had not launched this id yet (the
                    # launcher itself waits its handshake_timeout first), or the
                    # handshake met the dead learner's socket being reset (seen under
                    # load: "Connection reset by peer"). Both pass: try again, bounded.
                    if time.monotonic() >= deadline:
                        raise
                    time.sleep(_RETRY_S)
            credits = ThreadCredits(max_inflight)
            with self._lock:
                hello, closed = self._hello, self._closed
            if closed:
                conn.close()
                return
            if hello is not None:
                conn.send_bytes(hello)  # the new learner's group waits for it
        except (CollectorTimeout, CollectorRefused, OSError, EOFError) as exc:
            self.failed = f"collector {self._worker_id}: no learner took it back: {exc}"
            log.error("%s", self.failed)
            self.stop.set()
            return
        with self._lock:
            self._conn, self._credits = conn, credits
        log.info("collector %d: connected to a new learner at %s:%d", self._worker_id,
                 *self._address)
        self._read_from(conn, credits)


def connect(address: tuple[str, int], worker_id: int, *, authkey: bytes | None = None,
            timeout: float = 60.0) -> tuple[Connection, WorkerSpec, int]:
    """Connect to a learner's :class:`NetworkLauncher` as collector ``worker_id``.

    Raises:
        CollectorTimeout: nothing answered at ``address`` within ``timeout``, or what
            answered did not finish the handshake within it.
        CollectorRefused: the learner refused this collector (why, in the message:
            id out of range, already connected, never launched, or a wrong key).
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            sock = socket.create_connection(address, timeout=max(deadline - time.monotonic(),
                                                                  0.1))
            break
        except OSError as exc:
            if time.monotonic() > deadline:
                raise CollectorTimeout(f"no learner answered at {address[0]}:{address[1]} "
                                       f"within {timeout:.1f}s ({exc})", worker_id) from None
            time.sleep(_RETRY_S)  # the learner may not listen yet: retry, bounded
    conn = framed(sock, timeout)
    key = shared_key(authkey)
    try:
        answer_challenge(conn, key)
        deliver_challenge(conn, key)
        conn.send_bytes(json.dumps({"id": worker_id, "pid": os.getpid(),
                                    "host": socket.gethostname()}).encode())
        reply = conn.recv_bytes()
    except AuthenticationError as exc:
        conn.close()
        raise CollectorRefused(f"the learner at {address[0]}:{address[1]} refused collector "
                               f"{worker_id}'s key ({KEY_ENV}): {exc}", worker_id) from None
    except EOFError:
        conn.close()
        raise CollectorRefused(f"the learner at {address[0]}:{address[1]} closed collector "
                               f"{worker_id}'s connection during the handshake",
                               worker_id) from None
    except OSError as exc:
        conn.close()
        raise CollectorTimeout(f"the learner at {address[0]}:{address[1]} did not finish "
                               f"the handshake within {timeout:.1f}s ({exc})",
                               worker_id) from None
    unbounded(conn)
    if reply.startswith(b"{"):
        conn.close()
        raise CollectorRefused(f"the learner refused collector {worker_id}: "
                               f"{json.loads(reply)['error']}", worker_id)
    spec, max_inflight = pickle.loads(reply)  # from the learner, which proved the key
    return conn, spec, max_inflight


def main(argv: list[str] | None = None) -> int:
    """``python -m weight_sync.collectors.remote [--address HOST:PORT] [--id N]``: run one collector
    for a learner's :class:`NetworkLauncher` (address from ``WEIGHT_SYNC_COLLECTORS``,
    id from ``RANK`` by default); returns the worker's exit code (2: not admitted)."""
    parser = argparse.ArgumentParser(prog="python -m weight_sync.collectors.remote")
    parser.add_argument("--address", default=os.environ.get(ADDRESS_ENV))
    parser.add_argument("--id", type=int, default=None)
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--reattach-timeout", type=float, default=0.0,
                        help="when the learner dies, wait this long for a new one at the "
                             "same addresses (weights and batches) instead of exiting")
    args = parser.parse_args(argv)
    if not args.address or ":" not in args.address:
        parser.error(f"--address HOST:PORT (or {ADDRESS_ENV}) is needed")
    worker_id = args.id if args.id is not None else int(os.environ.get("RANK", "-1"))
    if worker_id < 0:
        parser.error("--id (or RANK) is needed")
    host, port = args.address.rsplit(":", 1)
    logging.basicConfig(level=logging.WARNING)
    try:
        conn, spec, max_inflight = connect((host, int(port)), worker_id,
                                           timeout=args.timeout)
    except (CollectorTimeout, CollectorRefused, OSError) as exc:
        log.error("%s", exc)
        return 2
    if args.reattach_timeout > 0:
        spec = dataclasses.replace(spec, reattach_timeout=args.reattach_timeout)
    channel = _Channel((host, int(port)), worker_id, conn, max_inflight,
                       reattach_timeout=args.reattach_timeout)
    code = run_worker(spec, channel, channel.stop, channel)
    return 1 if channel.failed else code
