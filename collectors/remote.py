"""Collectors started by someone else (torchrun, SLURM, a shell on another host), their
batches back over the network: the learner's :class:`NetworkLauncher` and the
collector's entry point ``python -m weight_sync.collectors.remote``.

Learner::

    launcher = NetworkLauncher(num_collectors=4, host="0.0.0.0", port=29700)
    group = CollectorGroup(policy, ..., num_collectors=4, launcher=launcher,
                           sender_config=SenderConfig(host="0.0.0.0", port=29600))
    group.start()          # waits (connect_timeout) for the four to connect

Each collector host::

    WEIGHT_SYNC_COLLECTORS=learner-host:29700 RANK=3 python -m weight_sync.collectors.remote

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

import contextlib
import json
import logging
import os
import pickle
import select
import socket
import sys
import threading
import time
from collections.abc import Sequence
from multiprocessing import AuthenticationError
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge, wait
from typing import Any

from weight_sync.collectors.launcher import WorkerHandle
from weight_sync.collectors.remote_collector import connect, main
from weight_sync.collectors.remote_connection import (
    ADDRESS_ENV,
    CREDIT,
    KEY_ENV,
    STOP,
    framed,
    shared_key,
    unbounded,
)
from weight_sync.collectors.worker import WorkerSpec

__all__ = ["ADDRESS_ENV", "KEY_ENV", "NetworkLauncher", "RemoteWorker", "connect", "main"]

log = logging.getLogger(__name__)


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
            self._send(STOP)

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
        self._send(CREDIT)

    def request_stop(self) -> None:
        self._stop_asked = True
        self._send(STOP)

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
        host: the address to listen on.
        port: the port to listen on (0: a free one, see :attr:`address`).
        authkey: the key collectors prove (default: ``WEIGHT_SYNC_COLLECTOR_KEY``).
        handshake_timeout: bound on one connecting collector's handshake.
    """

    def __init__(self, num_collectors: int, host: str = "127.0.0.1", port: int = 0, *,
                 authkey: bytes | None = None, handshake_timeout: float = 10.0) -> None:
        if not isinstance(num_collectors, int) or num_collectors < 1:
            raise ValueError(f"num_collectors must be an int >= 1, got {num_collectors!r}")
        self.num_collectors = num_collectors
        self._authkey = shared_key(authkey)
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
        conn = framed(sock, self._handshake_timeout)
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
        unbounded(conn)
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


if __name__ == "__main__":
    sys.exit(main())
