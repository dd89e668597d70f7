"""The demo across simulated hosts: the learner on host 0, its collectors on hosts 1..K.

On the project's test bed (:mod:`testbed`: network namespaces on a bridge, each link
shaped with tc to ``--rate`` both ways, each host with its own hostname and
``/dev/shm``), host 0 runs ``weight-sync demo --launcher network`` listening on its bed
address, and each collector runs ``python -m weight_sync.collectors.remote`` on host
``1 + id % K``: weights and batches cross the shaped links, nothing a pipe or shared
memory could shortcut. Every process shares one fresh collector key and one fresh
weight-stream secret. The demo's summary table is printed as it printed it, its JSON
(plus where each collector ran and how each process ended) written to ``--json-out``.

    sudo python -m benchmarks.demo_hosts --collector-hosts 2 --collectors 2 -- --iterations 200

Arguments after ``--`` go to the demo. Needs root and iproute2 (:func:`testbed.available`).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from weight_sync.collectors.remote import ADDRESS_ENV, KEY_ENV  # noqa: E402

import testbed  # noqa: E402
from testbed import TestBed  # noqa: E402

__all__ = ["PORT", "run_on_bed", "main"]

#: The launcher's port on host 0 (the host's network namespace is the bed's own).
PORT = 29700


def _reap(proc: subprocess.Popen[Any], timeout: float) -> int | None:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return None  # the bed kills it on close


def run_on_bed(collector_hosts: int, collectors: int, demo_args: list[str], *,
               rate: str | None = "1gbit", timeout: float = 600.0) -> dict[str, Any]:
    """Run the demo with ``collectors`` collectors spread over ``collector_hosts`` hosts.

    Returns:
        ``{"demo": <the demo's JSON>, "stdout": <its printed summary>, "returncode",
        "placement": {id: host name}, "collector_exit_codes": [...], "stderr": <tail>}``;
        ``"demo"`` is ``None`` if the demo wrote no JSON (failed; see ``stderr``).

    Raises:
        testbed.TestBedError: no bed can be built here (why, in the message).
        subprocess.TimeoutExpired: the demo ran past ``timeout`` (everything is killed).
    """
    env = {**os.environ, KEY_ENV: secrets.token_hex(16),
           "WEIGHT_SYNC_SECRET": secrets.token_hex(16),
           "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [
               os.environ.get("PYTHONPATH")])])}
    with TestBed(hosts=1 + collector_hosts, rate=rate) as bed, \
            tempfile.TemporaryFile("w+") as err:
        assert bed.tmpdir is not None
        home, out = bed.hosts[0], Path(bed.tmpdir) / "demo.json"
        listen = f"{home.address}:{PORT}"
        learner = home.popen(
            [sys.executable, "-m", "weight_sync.cli", "demo", "--launcher", "network",
             "--listen", listen, "--learner-host", home.address, "--collectors",
             str(collectors), "--quiet", "--json-out", str(out), *demo_args],
            cwd=str(ROOT), env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=err, text=True)
        placement = {cid: bed.hosts[1 + cid % collector_hosts] for cid in range(collectors)}
        procs = [host.popen([sys.executable, "-m", "weight_sync.collectors.remote",
                 "--id", str(cid),
                             "--timeout", "120"], cwd=str(ROOT), env={**env, ADDRESS_ENV: listen},
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
                 for cid, host in placement.items()]
        start = time.monotonic()
        stdout, _ = learner.communicate(timeout=timeout)  # the bed kills it on a timeout
        codes = [_reap(p, max(timeout - (time.monotonic() - start), 30.0)) for p in procs]
        err.seek(0)
        return {"demo": json.loads(out.read_text()) if out.exists() else None,
                "stdout": stdout, "returncode": learner.returncode,
                "placement": {cid: h.name for cid, h in placement.items()},
                "collector_exit_codes": codes, "stderr": err.read()[-4000:]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--collector-hosts", type=int, default=2)
    parser.add_argument("--collectors", type=int, default=2)
    parser.add_argument("--rate", default="1gbit", help="each link's rate (tc units)")
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--json-out", type=Path, default=None)
    args, demo_args = parser.parse_known_args(argv)
    demo_args = [a for a in demo_args if a != "--"]
    reason = testbed.available()
    if reason is not None:
        parser.error(f"no test bed here: {reason}")
    result = run_on_bed(args.collector_hosts, args.collectors, demo_args, rate=args.rate,
                        timeout=args.timeout)
    print(result["stdout"], end="")
    print(f"collectors on {result['placement']}, exit codes {result['collector_exit_codes']}")
    if args.json_out is not None:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(result, indent=2))
    if result["returncode"] != 0:
        print(result["stderr"], file=sys.stderr)
    return int(result["returncode"] or 0)


if __name__ == "__main__":
    raise SystemExit(main())
