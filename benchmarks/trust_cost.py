"""What integrity and authentication cost, per message, by size.

Two parts:

* **per step** (one process): the learner's checksum stamp (XXH3-64 of the payload),
  a collector's check of it; with a secret, the BLAKE3 digest of the message (once per
  snapshot on the learner, once per message on each collector) and the HMAC of a
  signal (signing and verifying);
* **per round** (a learner and one collector process, gloo over loopback): a round is
  ``send_weights_async`` + the collector's apply + ``wait_ack``, with the checksum off,
  on (the default), and with a secret; also the learner's time inside
  ``send_weights_async``.

Both processes run ``torch.set_num_threads(1)``; medians and p90 over ``--rounds``,
modes alternated round-robin so that a noisy neighbour hits them alike::

    python -m benchmarks.trust_cost --sizes 1e5 1e7 --rounds 30
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from weight_sync import WeightReceiver, WeightSender
from weight_sync.wire.auth import StreamKey, message_digest
from weight_sync.wire.layout import BufferLayout
from weight_sync.wire.packing import check_payload, write_header
from weight_sync.wire.protocol import Update

MODES = {"checksum off": {"checksum": False}, "checksum on": {}, "secret": {"secret": "s"}}


def _policy(params: int) -> dict[str, torch.Tensor]:
    return {"w": torch.randn(params)}


def _stats(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {"median_ms": statistics.median(ordered) * 1e3,
            "p90_ms": ordered[int(0.9 * (len(ordered) - 1))] * 1e3}


def _time(fn: Callable[[], object], rounds: int) -> dict[str, float]:
    fn()
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return _stats(samples)


def per_step(params: int, rounds: int) -> dict[str, dict[str, float]]:
    weights = _policy(params)
    layout = BufferLayout.from_weights(weights)
    message = torch.zeros(layout.nbytes, dtype=torch.uint8)
    layout.views(message)[0].copy_(weights["w"])
    key = StreamKey(b"secret", "policy", "nonce")
    write_header(message, layout, 1, checksum=True)
    digest = message_digest(message)
    signed = key.sign(3, 1, 7, Update(1, "note"), digest)
    plain = _time(lambda: write_header(message, layout, 1), rounds)
    stamped = _time(lambda: write_header(message, layout, 1, checksum=True), rounds)
    return {
        "checksum stamp (learner)": {k: stamped[k] - plain[k] for k in stamped},
        "checksum check (collector)": _time(lambda: check_payload(message, "bench"), rounds),
        "blake3 digest (learner once, each collector)": _time(
            lambda: message_digest(message), rounds),
        "hmac sign (learner, per link)": _time(
            lambda: key.sign(3, 1, 7, Update(1, "note"), digest), rounds),
        "hmac verify (collector)": _time(lambda: key.authentic(3, 1, 7, signed), rounds),
    }


def _collector_main(info: Any, params: int, secret: str, rounds: int) -> None:
    torch.set_num_threads(1)
    rx = WeightReceiver(_policy(params), info, 0, secret=secret, timeout=120)
    rx.connect(timeout=120)
    for _ in range(rounds):
        rx.receive_weights(timeout=None)
    rx.close()


def per_round(params: int, rounds: int) -> dict[str, dict[str, float]]:
    ctx = mp.get_context("spawn")
    senders, procs = {}, []
    try:
        for mode, options in MODES.items():
            sender = WeightSender(_policy(params), 1, timeout=120, name=mode.replace(" ", "-"),
                                  **options)
            proc = ctx.Process(target=_collector_main, daemon=True,
                               args=(sender.connection_info, params,
                                     str(options.get("secret", "")), rounds + 2))
            proc.start()
            procs.append(proc)
            sender.connect(timeout=120)
            senders[mode] = sender
        rounds_s: dict[str, list[float]] = {m: [] for m in MODES}
        send_s: dict[str, list[float]] = {m: [] for m in MODES}
        for i in range(rounds + 2):
            for mode, sender in senders.items():
                start = time.perf_counter()
                sender.send_weights_async()
                sent = time.perf_counter()
                sender.wait_ack(timeout=120)
                if i >= 2:  # warm-up
                    rounds_s[mode].append(time.perf_counter() - start)
                    send_s[mode].append(sent - start)
        out = {}
        for mode in MODES:
            out[f"round, {mode}"] = _stats(rounds_s[mode])
            out[f"send_weights_async, {mode}"] = _stats(send_s[mode])
        return out
    finally:
        for sender in senders.values():
            sender.close()
        for proc in procs:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
                proc.join(10)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=lambda s: int(float(s)), nargs="+",
                        default=[100_000, 10_000_000], help="float32 parameters")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results: dict[str, Any] = {}
    for params in args.sizes:
        mb = params * 4 / 1e6
        rows = {**per_step(params, args.rounds), **per_round(params, args.rounds)}
        results[str(params)] = rows
        print(f"\n{params:,} params ({mb:.1f} MB)")
        for name, st in rows.items():
            print(f"  {name:48s} median {st['median_ms']:8.3f} ms   p90 {st['p90_ms']:8.3f} ms")
    if args.json_out is not None:
        args.json_out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
