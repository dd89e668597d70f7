"""The processes of the relay tests on the simulated hosts: ``python relay_nodes.py
learner|collector <json args>``.

Weights are a pure function of the version (:func:`weights_at`), so a collector checks
every version it applied bit-exact on its own. Each process prints JSON lines: the
learner first its connection info, then one line per event the test may wait on, then
its report; a collector its report (or, with a ``freeze_at`` fault, ``"half"`` once it
is halfway through that version, after which it blocks reading stdin: the test then
kills it, or cuts its host off and lets it go on).
"""

from __future__ import annotations

import hashlib
import json
import socket
import sys
import time
from typing import Any

import torch

torch.set_num_threads(1)

import weight_sync  # noqa: E402
from weight_sync import WeightReceiver, WeightSender, WeightSyncError  # noqa: E402
from weight_sync.collector.hooks import ReceiverHooks  # noqa: E402
from weight_sync.config import RelayConfig  # noqa: E402
from weight_sync.errors import ClosedError, CollectorFailed  # noqa: E402


def weights_at(version: int, numel: int) -> dict[str, torch.Tensor]:
    i = torch.arange(numel, dtype=torch.int64)
    return {"w": ((i * 7 + version * 13) % 1009).to(torch.float32),
            "n": torch.tensor(version, dtype=torch.int64)}


def set_version(weights: dict[str, torch.Tensor], version: int) -> None:
    for name, value in weights_at(version, weights["w"].numel()).items():
        weights[name].copy_(value)


def fingerprint(weights: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(weights):
        digest.update(weights[name].reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def emit(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


def learner(args: dict[str, Any]) -> None:
    """Connect ``n`` collectors over ``transport``, publish versions 1..``last``; on a
    failure print it and (with ``rejoin``) wait for that collector to come back."""
    weights = weights_at(0, args["numel"])
    relay = RelayConfig(**args.get("relay", {}))
    with WeightSender(weights, args["n"], host=args["address"], transport=args["transport"],
                      timeout=30, liveness_timeout=args.get("liveness", 10.0),
                      relay=relay) as tx:
        emit(info=tx.connection_info.to_json())
        tx.connect(timeout=90)
        side = tx.learner_side("relay") if args["transport"] == "relay" else None
        rounds: list[dict[str, Any]] = []
        for version in range(1, args["last"] + 1):
            set_version(weights, version)
            start = time.perf_counter()
            tx.send_weights_async()
            failed: list[int] = []
            try:
                tx.wait_ack(timeout=60)
            except CollectorFailed as exc:
                failed = sorted(exc.result.failed)
                emit(event="failed", version=version, ids=failed)
            rounds.append({"version": version, "s": time.perf_counter() - start,
                           "acked": sorted(tx.links), "failed": failed,
                           "parents": None if side is None else side.parents(),
                           "slow": None if side is None else side.slow()})
            if failed and args.get("rejoin"):
                tx.wait_for(failed, timeout=90)
                emit(event="rejoined", version=version, ids=failed)
        emit(report=True, rounds=rounds, transports=tx.transports,
             fallbacks=None if side is None else side.fallbacks)


def freeze_halfway(version: int, nbytes: int) -> ReceiverHooks:
    """Hooks that stop this collector halfway through ``version``: print ``half``, then
    wait for a line on stdin (the test's move) before going on."""
    fired = False

    def during(got_version: int, received: int) -> None:
        nonlocal fired
        if not fired and got_version == version and received * 2 >= nbytes:
            fired = True
            print("half", flush=True)
            sys.stdin.readline()

    return ReceiverHooks(during_receive=during)


def slow_down(bytes_per_s: float) -> ReceiverHooks:
    """Hooks that make this collector a slow relay: it takes in at most ``bytes_per_s``."""
    last = [0]

    def during(version: int, received: int) -> None:
        if received < last[0]:  # a new version
            last[0] = 0
        time.sleep((received - last[0]) / bytes_per_s)  # the simulated fault itself
        last[0] = received

    return ReceiverHooks(during_receive=during)


def collector(args: dict[str, Any]) -> None:
    """Receive until the learner closes the stream (or an error), checking each applied
    version; report them and the error that ended it, if any."""
    info = weight_sync.ConnectionInfo.from_json(args["info"])
    weights = weights_at(-1, args["numel"])
    hooks = None
    if args.get("freeze_at") is not None:
        hooks = freeze_halfway(args["freeze_at"], 4 * args["numel"])
    elif args.get("slow_bps"):
        hooks = slow_down(args["slow_bps"])
    exact: dict[int, bool] = {}
    start = time.monotonic()

    def check(version: int) -> None:
        exact[version] = fingerprint(weights) == fingerprint(weights_at(version, args["numel"]))

    # The report goes out before the receiver closes: a collector cut off from the
    # learner reports its error at once, however long its close then takes.
    with WeightReceiver(weights, info, args["cid"], timeout=30, hooks=hooks) as rx:
        error = None
        try:
            check(rx.connect(timeout=90))
            # Until the learner closes the stream: a collector that left early would
            # make its children fall back to the learner for the last version.
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                got = rx.receive_weights(timeout=5)
                if got is not None:
                    check(got)
        except ClosedError:
            pass
        except WeightSyncError as exc:
            error = type(exc).__name__
        end = rx._link._end if rx._link is not None else None  # a test probe
        emit(cid=args["cid"], host=socket.gethostname(), exact=exact, error=error,
             s=time.monotonic() - start, fetched=dict(getattr(end, "fetched", {})))


if __name__ == "__main__":
    {"learner": learner, "collector": collector}[sys.argv[1]](json.loads(sys.argv[2]))
