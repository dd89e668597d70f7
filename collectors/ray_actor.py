"""What runs inside each collector's Ray actor (:class:`CollectorActor`); the learner's
side, placing and reading the actors, is :mod:`weight_sync.collectors.ray_launcher`."""

from __future__ import annotations

import os
import socket
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

import ray
from weight_sync.collectors.worker import ThreadCredits, WorkerSpec, run_worker

__all__ = ["ACTOR_METHODS", "CollectorActor"]

ACTOR_METHODS = ("pid", "node_info", "apply")
"""What :meth:`RayLauncher.run_all` / :meth:`RayLauncher.run_each` may call."""


class _Outbox:
    """The worker's :class:`~weight_sync.collectors.worker.MessageSink` inside the actor: messages
    wait here until the learner's ``next_messages`` call takes them."""

    def __init__(self) -> None:
        self._messages: deque[bytes | bytearray] = deque()
        self._closed = False
        self._changed = threading.Condition()

    def send_bytes(self, buf: bytes | bytearray) -> None:
        with self._changed:
            if self._closed:
                raise BrokenPipeError("the collector's outbox is closed")
            self._messages.append(buf)
            self._changed.notify_all()

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    def take(self) -> list[bytes | bytearray]:
        """Every message so far, waiting for one; ``[]`` once closed and empty."""
        with self._changed:
            self._changed.wait_for(lambda: self._messages or self._closed)
            out = list(self._messages)
            self._messages.clear()
            return out


class CollectorActor:
    """One collector as a Ray actor (threaded): :meth:`run` is its run loop, the learner
    takes its messages with :meth:`next_messages`."""

    def __init__(self, spec: WorkerSpec, max_inflight: int) -> None:
        self._spec = spec
        self._outbox = _Outbox()
        self._stop = threading.Event()
        self._credits = ThreadCredits(max_inflight)

    def run(self) -> int:
        """The collector's loop until it stops; its exit code (0 stopped, 1 reported)."""
        return run_worker(self._spec, self._outbox, self._stop, self._credits)

    def next_messages(self) -> list[bytes | bytearray]:
        """The messages sent since the last call, waiting for one; ``[]``: no more."""
        return self._outbox.take()

    @ray.method(num_returns=0)
    def release_credit(self) -> None:
        self._credits.release()

    @ray.method(num_returns=0)
    def request_stop(self) -> None:
        self._stop.set()

    def pid(self) -> int:
        return os.getpid()

    def node_info(self) -> dict[str, Any]:
        """Where this collector runs: worker id, pid, hostname, Ray node id and IP."""
        return {"worker_id": self._spec.worker_id, "pid": os.getpid(),
                "hostname": socket.gethostname(),
                "node_id": ray.get_runtime_context().get_node_id(),
                "node_ip": ray.util.get_node_ip_address()}

    def apply(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run ``fn(*args, **kwargs)`` in the collector's process (on a thread beside its
        run loop); its result."""
        return fn(*args, **kwargs)
