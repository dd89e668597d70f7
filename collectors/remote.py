"""Collectors started by someone else (torchrun, SLURM, a shell on another host), their
batches back over the network: the learner's :class:`NetworkLauncher` and the
collector's entry point ``python -m collectors.remote``.

Learner::

    launcher = NetworkLauncher(num_collectors=4, host="0.0.0.0", port=29700)
    group = CollectorGroup(policy, ..., num_collectors=4, launcher=launcher,
                           sender_config=SenderConfig(host="0.0.0.0", port=29600))
    group.start()          # waits (connect_timeout) for the four to connect

Each collector host::

    WEIGHT_SYNC_COLLECTORS=learner-host:29700 RANK=3 python -m collectors.remote

The launcher starts nothing: ``launch`` registers the collector's spec, and a process
that connects with that id (proving the shared key, ``WEIGHT_SYNC_COLLECTOR_KEY``, with
``multiprocessing``'s challenge) receives it and runs the same worker loop as a local
process; its messages (hello, version-tagged batches, errors) come back over the
connection, and credits and the stop signal go the other way. A collector whose
connection ends is reported by the group like a dead local process; one cut off (no
byte arrives, nothing closes) by its weight link's heartbeat (``liveness_timeout``).

With ``CollectorGroup(..., max_restarts=k)`` a failed collector's id is registered
again instead: the launcher cannot start a process elsewhere, so the group goes on with
the others, and a process started again with that id (by whoever started the first)
rejoins and is caught up.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import pickle
import select
import socket
import struct
import sys
import threading
import time
from collections.abc import Sequence
from multiprocessing import AuthenticationError
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge, wait
from typing import Any

from collectors.errors import CollectorRefused, CollectorTimeout
from collectors.launcher import WorkerHandle
from collectors.transport import decode_header
from collectors.worker import WorkerSpec, run_worker

__all__ = ["NetworkLauncher", "RemoteWorker", "KEY_ENV", "ADDRESS_ENV", "main"]

log = logging.getLogger(__name__)

#: The shared key a remote collector proves (default: a fixed, public one; set it).
KEY_ENV = "WEIGHT_SYNC_COLLECTOR_KEY"
#: ``host:port`` of the learner's :class:`NetworkLauncher`, for the entry point.
ADDRESS_ENV = "WEIGHT_SYNC_COLLECTORS"
_DEFAULT_KEY = b"weight-sync-collectors"
_CREDIT, _STOP = b"c", b"s"


def _framed(sock: socket.socket, timeout: float) -> Connection:
    """A framed ``Connection`` over ``sock`` whose reads fail after ``timeout`` s without
    data (an OS-level receive timeout: ``Connection`` needs a blocking socket) until
    :func:`_unbounded` lifts it."""
    sock.setblocking(True)
    # Connection writes a large message's length and body in two sends: with Nagle the
    # body waits for the peer's delayed ACK of the length (p50 11 ms per 22 KB batch
    # over loopback, measured; 1.2 ms without Nagle).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sec = max(int(timeout), 0)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                    struct.pack("ll", sec, int((timeout - sec) * 1e6)))
    return Connection(sock.detach())


def _unbounded(conn: Connection) -> None:
    with socket.socket(fileno=os.dup(conn.fileno())) as view:
        view.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 0, 0))


def _key(authkey: bytes | None) -> bytes:
    if authkey is not None:
        return authkey
    env = os.environ.get(KEY_ENV)
    return env.encode() if env else _DEFAULT_KEY


class RemoteWorker:
    """The learner's handle on a collector that connected over the network."""

    def __init__(self, worker_id: int, spec: WorkerSpec, max_inflight: int) -> None:
        self.worker_id = worker_id
        self.spec = spec
        self.max_inflight = max_inflight
        self.host = ""
        self._pid: int | None = None
        self._conn: Connection | None = None
        self._ended = False
        self._stop_asked = False

    def attach(self, conn: Connection, pid: int, host: str) -> None:
        self._conn, self._pid, self.host = conn, pid, host
        if self._stop_asked:
            self._send(_STOP)

    @property
    def connected(self) -> bool:
        return self._conn is not None

    @property
    def connection(self) -> Connection | None:
        return self._conn

    @property
    def pid(self) -> int | None:
        return self._pid

    @property
    def exitcode(self) -> int | None:
        return None  # another host's process: its exit code is not ours to know

    def end_reason(self) -> str:
        return f"its connection from {self.host or '?'} (pid {self._pid}) closed"

    def receive(self) -> bytes | None:
        conn = self._conn
        if conn is None:
            return None
        try:
            if conn.poll(0):
                return conn.recv_bytes()
        except (EOFError, OSError):
            self._ended = True
            raise EOFError(f"collector {self.worker_id}'s connection closed") from None
        return None

    def is_alive(self) -> bool:
        # Never connected and asked to stop: nothing will come from it.
        return not self._ended and (self._conn is not None or not self._stop_asked)

    def _send(self, what: bytes) -> None:
        if self._conn is not None and not self._ended:
            with contextlib.suppress(OSError):
                self._conn.send_bytes(what)

    def release_credit(self) -> None:
        self._send(_CREDIT)

    def request_stop(self) -> None:
        self._stop_asked = True
        self._send(_STOP)

    def join(self, timeout: float) -> None:
        """Wait up to ``timeout`` for the collector to close its connection."""
        deadline = time.monotonic() + timeout
        while self._conn is not None and not self._ended:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            try:
                if self._conn.poll(remaining):
                    self._conn.recv_bytes()  # what it still sends after the stop
            except (EOFError, OSError):
                self._ended = True

    def terminate(self) -> None:
        self.close()  # a remote process cannot be signalled: its stop is the close

    def kill(self) -> None:
        self.close()

    def close(self) -> None:
        self._ended = True
        if self._conn is not None:
            self._conn.close()

    def __repr__(self) -> str:
        return f"RemoteWorker(id={self.worker_id}, host={self.host!r}, pid={self._pid})"


class NetworkLauncher:
    """Waits for collectors started elsewhere to connect, and hands each its spec.

    Args:
        num_collectors: ids ``0..num_collectors-1`` are accepted; others are refused.
        host, port: where to listen (port 0: a free one, see :attr:`address`).
        authkey: the key collectors prove (default: ``WEIGHT_SYNC_COLLECTOR_KEY``).
        handshake_timeout: bound on one connecting collector's handshake.
    """

    def __init__(self, num_collectors: int, host: str = "127.0.0.1", port: int = 0, *,
                 authkey: bytes | None = None, handshake_timeout: float = 10.0) -> None:
        if not isinstance(num_collectors, int) or num_collectors < 1:
            raise ValueError(f"num_collectors must be an int >= 1, got {num_collectors!r}")
        self.num_collectors = num_collectors
        self._authkey = _key(authkey)
        self._handshake_timeout = handshake_timeout
        self._lock = threading.Lock()
        self._workers: dict[int, RemoteWorker] = {}
        self._closed = False
        self._listener = socket.create_server((host, port))
        self.address: tuple[str, int] = self._listener.getsockname()[:2]
        self._wake_r, self._wake_w = os.pipe()
        threading.Thread(target=self._accept, daemon=True,
                         name="weight-sync-network-launcher").start()

    @property
    def hosts(self) -> dict[int, str]:
        """Collector id -> the hostname its process reported, for those connected."""
        with self._lock:
            return {cid: w.host for cid, w in sorted(self._workers.items()) if w.connected}

    def launch(self, spec: WorkerSpec, max_inflight: int) -> RemoteWorker:
        """Register collector ``spec.worker_id``; it runs once its process connects."""
        worker = RemoteWorker(spec.worker_id, spec, max_inflight)
        with self._lock:
            old = self._workers.get(spec.worker_id)
            if old is not None:
                old.close()
            self._workers[spec.worker_id] = worker
        return worker

    def wait(self, workers: Sequence[WorkerHandle], timeout: float) -> list[WorkerHandle]:
        """Wait on the connected workers' connections (and for new connections)."""
        by_conn: dict[Any, WorkerHandle] = {}
        for w in workers:
            if not isinstance(w, RemoteWorker):
                raise TypeError(f"NetworkLauncher.wait got {w!r}, not a RemoteWorker")
            if w.connection is not None:
                by_conn[w.connection] = w
        ready = wait([*by_conn, self._wake_r], max(timeout, 0))
        if self._wake_r in ready:
            os.read(self._wake_r, 4096)
        return [by_conn[c] for c in ready if c in by_conn]

    def _accept(self) -> None:
        while True:
            try:
                listening = self._listener.fileno()
                readable = select.select([listening, self._wake_r], [], [])[0]
                if self._closed:
                    return
                if listening not in readable:
                    continue
                sock, peer = self._listener.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._handshake, args=(sock, peer), daemon=True,
                             name="weight-sync-collector-handshake").start()

    def _handshake(self, sock: socket.socket, peer: Any) -> None:
        conn = _framed(sock, self._handshake_timeout)
        try:
            deliver_challenge(conn, self._authkey)
            answer_challenge(conn, self._authkey)
            if not conn.poll(self._handshake_timeout):
                raise TimeoutError("no hello")
            hello = json.loads(conn.recv_bytes(4096))
            cid, pid, host = int(hello["id"]), int(hello["pid"]), str(hello["host"])
        except (OSError, EOFError, ValueError, KeyError, TypeError,
                AuthenticationError) as exc:
            log.warning("a collector connection from %s failed its handshake: %s", peer, exc)
            conn.close()
            return
        _unbounded(conn)
        refusal = self._admit(cid, conn, pid, host)
        if refusal is not None:
            log.warning("refused collector %d from %s: %s", cid, host, refusal)
            with contextlib.suppress(OSError):
                conn.send_bytes(json.dumps({"error": refusal}).encode())
            conn.close()

    def _admit(self, cid: int, conn: Connection, pid: int, host: str) -> str | None:
        """Attach ``conn`` to collector ``cid``'s handle once it is launched (bounded);
        why not, otherwise."""
        if not 0 <= cid < self.num_collectors:
            return f"collector id {cid} is outside [0, {self.num_collectors})"
        deadline = time.monotonic() + self._handshake_timeout
        while True:
            with self._lock:
                if self._closed:
                    return "the learner is shutting down"
                worker = self._workers.get(cid)
                if worker is not None and worker.connected:
                    return f"collector {cid} is already connected (from {worker.host})"
                if worker is not None:
                    conn.send_bytes(pickle.dumps((worker.spec, worker.max_inflight)))
                    worker.attach(conn, pid, host)
                    os.write(self._wake_w, b"x")
                    log.info("collector %d connected from %s (pid %d)", cid, host, pid)
                    return None
            if time.monotonic() > deadline:
                return f"collector {cid} was not launched within {self._handshake_timeout}s"
            time.sleep(0.05)  # launch() runs right after the group starts: poll, bounded

    def shutdown(self, timeout: float) -> None:
        """Stop accepting and close every connection; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            workers = list(self._workers.values())
        os.write(self._wake_w, b"x")
        self._listener.close()
        for worker in workers:
            worker.close()


# -- the collector's side ----------------------------------------------------------------
class _Credits:
    """A semaphore spelled like ``multiprocessing``'s (``block=``), as the worker loop
    takes it."""

    def __init__(self, value: int) -> None:
        self._semaphore = threading.Semaphore(value)

    def acquire(self, block: bool = True, timeout: float | None = None) -> bool:
        return self._semaphore.acquire(blocking=block, timeout=timeout if block else None)

    def release(self) -> None:
        self._semaphore.release()


class _Channel:
    """The collector's end of its connection to the learner's launcher: the sink of its
    messages (:class:`~collectors.worker.MessageSink`), its credits and its stop signal.

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
        self._credits = _Credits(max_inflight)
        self._hello: bytes | None = None
        self._closed = False
        self._read_from(conn, self._credits)

    def _read_from(self, conn: Connection, credits: _Credits) -> None:
        threading.Thread(target=self._read, args=(conn, credits), daemon=True,
                         name="weight-sync-remote-control").start()

    def _read(self, conn: Connection, credits: _Credits) -> None:
        try:
            while True:
                what = conn.recv_bytes()
                if what == _CREDIT:
                    credits.release()
                elif what == _STOP:
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
                except CollectorRefused:
                    # E.g. the new learner's group had not launched this id yet
                    # (the launcher itself waits its handshake_timeout first).
                    if time.monotonic() >= deadline:
                        raise
            credits = _Credits(max_inflight)
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
            time.sleep(0.2)  # the learner may not listen yet: retry, bounded
    conn = _framed(sock, timeout)
    key = _key(authkey)
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
    _unbounded(conn)
    if reply.startswith(b"{"):
        conn.close()
        raise CollectorRefused(f"the learner refused collector {worker_id}: "
                               f"{json.loads(reply)['error']}", worker_id)
    spec, max_inflight = pickle.loads(reply)  # from the learner, which proved the key
    return conn, spec, max_inflight


def main(argv: list[str] | None = None) -> int:
    """``python -m collectors.remote [--address HOST:PORT] [--id N]``: run one collector
    for a learner's :class:`NetworkLauncher` (address from ``WEIGHT_SYNC_COLLECTORS``,
    id from ``RANK`` by default); returns the worker's exit code (2: not admitted)."""
    parser = argparse.ArgumentParser(prog="python -m collectors.remote")
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


if __name__ == "__main__":
    sys.exit(main())
