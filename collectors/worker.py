"""The collector process: env + policy + WeightReceiver, returning tagged batches.

:func:`run_worker` is the entry point of one collector process. It builds its
environment and policy *inside the process* from the picklable factories of a
:class:`WorkerSpec` (module-level functions; no live model crosses the process
boundary, only the small :class:`~weight_sync.ConnectionInfo`), pins itself to one
thread, connects a :class:`~weight_sync.WeightReceiver` (whose ``connect`` is the
initial sync: the policy never acts with its own random initialisation), then loops:

1. wait for a *credit* (at most ``max_inflight`` batches not yet taken by the learner,
   so a slow learner gets fresh batches, not a backlog), applying new weights meanwhile;
2. roll out ``frames_per_batch`` steps with the spec's ``collect_fn``; the policy is wrapped
   by :class:`VersionTagger`, which polls ``receive_weights(timeout=0)`` before every
   step (or only between batches) and writes into every step the version (and, on
   request, a checksum) of the weights that chose its action;
3. send the batch to the learner over its channel, a :class:`MessageSink` (a pipe for a
   local process; see :mod:`weight_sync.collectors.batch_messages` for the format, its measured
   cost and
   why it beats shared-memory tensors).

Per-step tags make the version honest: with per-step polling an update can land in the
middle of a batch, and each transition says which weights produced it (PPO's ratio uses
the logged log-probs, so a mixed batch is still correct).

It stops cleanly on the learner's stop signal or when the learner closes the weight
stream (``ClosedError``); it exits promptly when the learner dies (``PeerGone`` from the
receiver, the parent process gone, or a broken pipe). Any other exception is reported
to the learner as a formatted traceback, and the process exits with code 1.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Protocol

import torch
from tensordict import TensorDictBase
from tensordict.nn import TensorDictModuleBase
from weight_sync.collectors.batch_messages import encode_message

from weight_sync import ConnectionInfo, WeightReceiver
from weight_sync.errors import ClosedError, PeerGone
from weight_sync.wire.layout import named_leaves

__all__ = [
    "CHECKSUM_KEY",
    "VERSION_KEY",
    "WORKER_KEY",
    "MessageSink",
    "ThreadCredits",
    "VersionTagger",
    "WorkerSpec",
    "policy_checksum",
    "process_main",
    "run_worker",
]

log = logging.getLogger(__name__)

VERSION_KEY = "policy_version"
"""Per-step int64: the weight version that chose the step's action."""
WORKER_KEY = "collector_id"
"""Per-step int64: the id of the collector that produced the step."""
CHECKSUM_KEY = "policy_checksum"
"""Per-step float64 (only with ``record_checksum``): :func:`policy_checksum` of the weights."""

# While waiting for a credit, the worker applies new weights in slices this long.
_IDLE_SLICE_S = 0.01


class _Event(Protocol):
    def is_set(self) -> bool: ...


class _Credits(Protocol):
    def acquire(self, block: bool = True, timeout: float | None = None) -> bool: ...


class ThreadCredits:
    """Credits for a worker whose learner end lives in this process's threads (a Ray
    actor, a remote collector's channel): a ``threading.Semaphore`` spelled like
    ``multiprocessing``'s (``block=``), as the worker loop takes it."""

    def __init__(self, value: int) -> None:
        self._semaphore = threading.Semaphore(value)

    def acquire(self, block: bool = True, timeout: float | None = None) -> bool:
        return self._semaphore.acquire(blocking=block, timeout=timeout if block else None)

    def release(self) -> None:
        self._semaphore.release()


class MessageSink(Protocol):
    """Where a collector writes its messages: the write end of a local pipe
    (``multiprocessing.connection.Connection``) or any channel with the same two calls."""

    def send_bytes(self, buf: bytes | bytearray) -> None: ...

    def close(self) -> None:
        """No more messages: the learner reads the end of the channel after the last one."""


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a collector process needs; small and picklable."""

    worker_id: int
    """Collector id, ``0 <= worker_id < info.num_collectors``."""
    info: ConnectionInfo
    """The learner's ``WeightSender.connection_info``."""
    env_factory: Callable[[int], Any]
    """Module-level function ``seed -> env`` (e.g. ``weight_sync.collectors.task.make_env``)."""
    policy_factory: Callable[[], Any]
    """Module-level function building the policy (same layout as the learner's)."""
    collect_fn: Callable[..., Any]
    """Module-level rollout ``(env, policy, frames, state) -> (batch, state)`` (e.g.
    ``weight_sync.collectors.task.collect``); ``state`` is ``None`` on the first batch. Required:
    the
    worker is task-agnostic and has no default rollout."""
    frames_per_batch: int = 256
    """Environment steps per batch."""
    seed: int = 0
    """Base seed; the env gets ``seed + 1000 * worker_id``, torch ``seed + worker_id``."""
    poll_every_step: bool = True
    """Poll for new weights before every step (``False``: only between batches)."""
    record_checksum: bool = False
    """Also tag every step with :func:`policy_checksum` (for tests and debugging)."""
    connect_timeout: float = 60.0
    """Bound on the receiver's connect (rendezvous + initial sync), in seconds."""
    receiver_timeout: float = 60.0
    """Bound on each store operation and transfer of the receiver, in seconds."""
    reattach_timeout: float = 0.0
    """``> 0``: a lost learner is waited for this long at the same address instead of
    ending the worker (``ReceiverConfig.reattach_timeout``; the worker keeps its weights
    and its environment meanwhile). ``python -m weight_sync.collectors.remote --reattach-timeout``
    sets it, and reconnects its batch channel too."""

    @property
    def env_seed(self) -> int:
        return self.seed + 1000 * self.worker_id


def policy_checksum(policy: Any) -> float:
    """Sum of every weight (parameters and buffers) in float64: equal weights, equal sums."""
    return float(sum(float(t.detach().double().sum()) for t in named_leaves(policy).values()))


class _Stopped(Exception):
    """The learner asked this worker to stop."""


class VersionTagger(TensorDictModuleBase):
    """Wraps the policy: polls for new weights, then tags each step with their version.

    Args:
        policy: the TensorDict policy the receiver keeps current.
        receiver: the connected :class:`~weight_sync.WeightReceiver` of ``policy``.
        worker_id: written into every step under :data:`WORKER_KEY`.
        stop: the stop signal, checked at every poll.
        poll_every_step: poll before each step (else only when :meth:`poll` is called).
        record_checksum: also write :data:`CHECKSUM_KEY`.
    """

    def __init__(self, policy: Any, receiver: WeightReceiver, worker_id: int, stop: _Event,
                 poll_every_step: bool = True, record_checksum: bool = False) -> None:
        super().__init__()
        self.policy = policy
        self.in_keys = list(policy.in_keys)
        self.out_keys = [*policy.out_keys, VERSION_KEY, WORKER_KEY] + (
            [CHECKSUM_KEY] if record_checksum else [])
        self._receiver = receiver
        self._worker = torch.tensor(worker_id, dtype=torch.int64)
        self._stop = stop
        self._poll_every_step = poll_every_step
        self._record_checksum = record_checksum
        self.applied = 0
        self._retag()

    @property
    def version(self) -> int:
        return self._receiver.version

    def _retag(self) -> None:
        # One tensor per version, shared by every step (stacking copies the values).
        self._tags = {VERSION_KEY: torch.tensor(self._receiver.version, dtype=torch.int64),
                      WORKER_KEY: self._worker}
        if self._record_checksum:
            self._tags[CHECKSUM_KEY] = torch.tensor(policy_checksum(self.policy),
                                                    dtype=torch.float64)

    def poll(self, timeout: float = 0) -> int | None:
        """Apply new weights if any arrived (waiting up to ``timeout`` s); check stop."""
        if self._stop.is_set():
            raise _Stopped
        version = self._receiver.receive_weights(timeout=timeout)
        if version is not None:
            self.applied += 1
            self._retag()
        return version

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        if self._poll_every_step:
            self.poll()
        out = self.policy(tensordict)
        for key, value in self._tags.items():
            out.set(key, value.expand(out.batch_size))
        return out


def _send(conn: MessageSink, kind: str, batch: TensorDictBase | None = None,
          **fields: Any) -> None:
    conn.send_bytes(encode_message(kind, fields, batch))


def _learner_gone() -> bool:
    parent = multiprocessing.parent_process()
    return parent is not None and not parent.is_alive()


def _serve(spec: WorkerSpec, conn: MessageSink, stop: _Event, credits: _Credits) -> None:
    torch.manual_seed(spec.seed + spec.worker_id)
    env = spec.env_factory(spec.env_seed)
    policy = spec.policy_factory()
    _send(conn, "hello", worker_id=spec.worker_id, pid=os.getpid())
    receiver = WeightReceiver(policy, spec.info, spec.worker_id, timeout=spec.receiver_timeout,
                              reattach_timeout=spec.reattach_timeout)
    try:
        receiver.connect(spec.connect_timeout)
        actor = VersionTagger(policy, receiver, spec.worker_id, stop, spec.poll_every_step,
                              spec.record_checksum)
        state = None
        seq = 0
        while True:
            while not credits.acquire(block=False):
                actor.poll(timeout=_IDLE_SLICE_S)  # stay current while the learner is busy
                if _learner_gone():
                    raise PeerGone(f"collector {spec.worker_id}: the learner process died")
            actor.poll()
            start = time.perf_counter()
            batch, state = spec.collect_fn(env, actor, spec.frames_per_batch, state)
            versions = batch.get(VERSION_KEY)
            _send(conn, "batch", batch, worker_id=spec.worker_id, seq=seq,
                  version_min=int(versions.min()), version_max=int(versions.max()),
                  collect_s=time.perf_counter() - start, sent_at=time.time())
            seq += 1
    finally:
        receiver.close()
        with contextlib.suppress(Exception):
            env.close()


def run_worker(spec: WorkerSpec, conn: MessageSink, stop: _Event, credits: _Credits) -> int:
    """Run a collector until it is stopped; return its exit code.

    Args:
        spec: what to build and how to connect.
        conn: write end of this worker's channel to the learner (a pipe's
            ``Connection`` for a local process); closed when the worker returns.
        stop: set by the learner to ask for a clean stop.
        credits: semaphore; one is taken per batch and given back by the learner when it
            takes the batch.

    Returns:
        0 after a stop (stop signal, learner closed the stream, learner gone), 1 after
        reporting any other exception to the learner.
    """
    if threading.current_thread() is threading.main_thread():
        # Ctrl-C reaches the whole process group; the learner decides how its collectors
        # stop. (A worker run by a host's thread, e.g. a Ray actor, leaves signals to it.)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)
    failed = False
    try:
        _serve(spec, conn, stop, credits)
    except _Stopped:
        _report(conn, "stopped", worker_id=spec.worker_id, reason="stop signal")
    except ClosedError as exc:
        _report(conn, "stopped", worker_id=spec.worker_id, reason=str(exc))
    except (PeerGone, BrokenPipeError, EOFError) as exc:
        if not (stop.is_set() or _learner_gone() or isinstance(exc, (BrokenPipeError, EOFError))):
            failed = _report(conn, "error", worker_id=spec.worker_id, error=repr(exc),
                             traceback=traceback.format_exc())
    except BaseException as exc:  # reported, never swallowed: the process exits with 1
        failed = True
        _report(conn, "error", worker_id=spec.worker_id, error=repr(exc),
                traceback=traceback.format_exc())
    finally:
        conn.close()
    return 1 if failed else 0


def process_main(spec: WorkerSpec, conn: Connection, stop: _Event, credits: _Credits) -> None:
    """Target of a local collector process: :func:`run_worker`, then a fast exit.

    Everything the worker holds is released explicitly by :func:`run_worker`; the
    interpreter's own teardown of torch's C++ state then took ~2 s per process here, so
    the process leaves with ``os._exit`` (after flushing its streams) instead.
    """
    code = run_worker(spec, conn, stop, credits)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def _report(conn: MessageSink, kind: str, **fields: Any) -> bool:
    """Send a final message if the learner still listens; ``True`` once attempted."""
    with contextlib.suppress(OSError, ValueError):
        _send(conn, kind, **fields)
    return True
