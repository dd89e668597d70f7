"""Fan-out across simulated hosts: how a round grows with the number of collector hosts.

On the project's test bed (:mod:`testbed`: network namespaces on a bridge, each host's
link shaped with tc to ``--rate`` both ways, each host with its own hostname and
``/dev/shm``), a learner on host 0 pushes a policy of ``--params`` float32 parameters to
one collector on each of hosts 1..H, for H in ``--hosts``. For every H, in an order
rotated from one H to the next, one run of each series:

* ``default``: weight-sync with no settings: ``WeightSender(policy, N, host=<host 0's
  address>)``, no transport keyword (what a user gets; ``placements`` records where the
  sender put each collector);
* ``relay``: weight-sync, ``transport="relay"`` (chain, ``fanout=1``);
* ``direct``: weight-sync, ``transport="distributed"`` (one gloo pair per collector);
* ``torchrl``: torchrl's ``DistributedWeightSyncScheme`` (its real classes; sender on
  host 0, one worker per host, one round = ``scheme.send()``: per worker in turn, then
  the acks);
* ``tcp_chain``: the wire's limit for a relay: plain TCP, 4 MB pieces forwarded hop to
  hop while they arrive, the last hop answering with one byte;
* ``wire``: ``bytes / rate``, computed (one copy over one link).

A weight-sync round is ``send_weights_async`` -> ``wait_ack`` from all collectors
(``async_s``: the learner's time inside ``send_weights_async``); after the last round
every collector's weights are compared with the learner's (``correct``). Medians of
``--rounds`` rounds after ``--warmup``. Every process runs ``torch.set_num_threads(1)``.
``--small-params`` (default 100K) repeats the weight-sync series and torchrl with a small
policy for latency (the chain adds a hop per host). ``--series`` measures only some series.

    python -m benchmarks.fanout                      # 25M params, hosts 1 2 4 8, 1 Gbit/s
    python -m benchmarks.fanout --quick              # 2.5M params, hosts 1 2, 2 rounds
    python -m benchmarks.fanout --hosts 1 8 --series default relay

Writes ``benchmarks/results/fanout-<stamp>.json`` and ``.png`` (``--quick``: under
``benchmarks/results/quick/``) and prints a markdown table. Needs root and iproute2.
The run quoted in the docs is kept as ``benchmarks/results/fanout.json`` / ``fanout.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import testbed  # noqa: E402
from testbed import TestBed  # noqa: E402

BENCH_DIR = Path(__file__).resolve().parent
SERIES = ("default", "relay", "direct", "torchrl", "tcp_chain")
_COLORS = {"default": "tab:purple", "relay": "tab:blue", "direct": "tab:orange",
           "torchrl": "tab:green", "tcp_chain": "tab:red", "wire": "tab:gray"}
_RATES = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9}


def rate_bits(rate: str) -> float:
    """``"1gbit"`` -> 1e9 (tc's units)."""
    for unit, scale in _RATES.items():
        if rate.endswith(unit):
            return float(rate[: -len(unit)]) * scale
    raise ValueError(f"rate {rate!r}: use a number with kbit, mbit or gbit")


class Procs:
    """The processes of one run: started on hosts, read line by line, always reaped.

    Each is ``python -m <module> <role> <json args>`` (``module``: where the roles are).
    """

    def __init__(self, timeout: float, module: str = "benchmarks.fanout_nodes") -> None:
        self.timeout = timeout
        self.module = module
        self.procs: list[subprocess.Popen[str]] = []
        self.errs: list[Path] = []
        self.pending: dict[int, bytes] = {}  # per pid: bytes read but not yet a line

    def start(self, host: testbed.Host, role: str, args: dict[str, Any]
              ) -> subprocess.Popen[str]:
        with tempfile.NamedTemporaryFile("w", prefix=f"fanout-{role}-", suffix=".err",
                                         delete=False) as err:
            proc = host.popen([sys.executable, "-m", self.module, role,
                               json.dumps(args)], stdout=subprocess.PIPE, stderr=err,
                              text=True, cwd=str(ROOT))
        self.procs.append(proc)
        self.errs.append(Path(err.name))
        return proc

    def line(self, proc: subprocess.Popen[str], timeout: float | None = None) -> Any:
        """The next JSON line of ``proc`` (bounded)."""
        assert proc.stdout is not None
        deadline = time.monotonic() + (timeout or self.timeout)
        fd, pending = proc.stdout.fileno(), self.pending.setdefault(proc.pid, b"")
        while True:
            while b"\n" in pending:
                text, pending = pending.split(b"\n", 1)
                self.pending[proc.pid] = pending
                if text.startswith(b"{"):
                    return json.loads(text)
            # Raw reads: a buffered readline() may pull several lines into Python's
            # buffer, after which select() would wait on an empty pipe.
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                raise TimeoutError(f"no line from {proc.args[-2]} within "
                                   f"{timeout or self.timeout:.0f}s{self._why(proc)}")
            chunk = os.read(fd, 65536)
            if not chunk:
                raise RuntimeError(f"{proc.args[-2]} ended (rc {proc.wait(5)})"
                                   f"{self._why(proc)}")
            pending += chunk

    def _why(self, proc: subprocess.Popen[str]) -> str:
        err = self.errs[self.procs.index(proc)]
        tail = [ln for ln in err.read_text().splitlines()
                if not ln.startswith(("frame #", "Exception raised", "[W"))][-8:]
        return (":\n" + "\n".join(tail)) if tail else ""

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs:
            proc.wait(10)
        for err in self.errs:
            err.unlink(missing_ok=True)


def _ws(bed: TestBed, hosts: int, numel: int, transport: str | None, a: dict[str, Any]
        ) -> dict[str, Any]:
    """One weight-sync run; ``transport=None``: no transport keyword (the default)."""
    procs = Procs(a["timeout"] * 3)
    try:
        home = bed.hosts[0]
        learner = procs.start(home, "ws_learner", {**a, "address": home.address, "n": hosts,
                                                   "numel": numel, "transport": transport})
        info = procs.line(learner)["info"]
        last = a["warmup"] + a["rounds"]
        cols = [procs.start(bed.hosts[h], "ws_collector",
                            {"info": info, "cid": h - 1, "numel": numel, "last": last,
                             "timeout": a["timeout"]}) for h in range(1, hosts + 1)]
        rep = procs.line(learner, a["timeout"] * (last + 3))
        got = [procs.line(c) for c in cols]
    finally:
        procs.close()
    return {"rounds_s": rep["rounds_s"], "async_s": rep["async_s"],
            "median_s": statistics.median(rep["rounds_s"]),
            "async_median_s": statistics.median(rep["async_s"]),
            "fallbacks": rep["fallbacks"], "placements": rep["placements"],
            "correct": all(g["digest"] == rep["digest"] and g["version"] == last
                           for g in got)}


def _torchrl(bed: TestBed, hosts: int, numel: int, a: dict[str, Any]) -> dict[str, Any]:
    procs = Procs(a["timeout"] * 3)
    with tempfile.TemporaryDirectory(prefix="fanout-trl-") as tmp:
        scheme_file = str(Path(tmp) / "scheme.pkl")
        try:
            common = {**a, "n": hosts, "numel": numel, "scheme_file": scheme_file,
                      "last": a["warmup"] + a["rounds"]}
            learner = procs.start(bed.hosts[0], "trl_learner", common)
            procs.line(learner)  # ready: the scheme is pickled for the workers
            workers = [procs.start(bed.hosts[h], "trl_worker", {**common, "rank": h})
                       for h in range(1, hosts + 1)]
            rep = procs.line(learner, a["timeout"] * (common["last"] + 3))
            got = [procs.line(w) for w in workers]
        finally:
            procs.close()
    return {"rounds_s": rep["rounds_s"], "median_s": statistics.median(rep["rounds_s"]),
            "correct": all(g["digest"] == rep["digest"] and g["stopped"] for g in got)}


def _chain(bed: TestBed, hosts: int, nbytes: int, a: dict[str, Any]) -> dict[str, Any]:
    procs = Procs(a["timeout"] * 3)
    port, done_port = 29555, 29556
    total = a["warmup"] + a["rounds"]
    try:
        hops = []
        for h in range(1, hosts + 1):
            last = h == hosts
            nxt = bed.hosts[0 if last else h + 1].address
            hops.append(procs.start(bed.hosts[h], "chain_hop", {
                "address": bed.hosts[h].address, "port": port, "next": nxt,
                "next_port": done_port if last else port, "last": last, "nbytes": nbytes,
                "rounds": total, "timeout": a["timeout"]}))
        for hop in hops:
            procs.line(hop)
        source = procs.start(bed.hosts[0], "chain_source", {
            **a, "address": bed.hosts[0].address, "done_port": done_port,
            "first": bed.hosts[1].address, "first_port": port, "nbytes": nbytes})
        procs.line(source)
        rep = procs.line(source, a["timeout"] * (total + 3))
    finally:
        procs.close()
    return {"rounds_s": rep["rounds_s"], "median_s": statistics.median(rep["rounds_s"])}


def measure(bed: TestBed, series: str, hosts: int, numel: int, a: dict[str, Any]
            ) -> dict[str, Any]:
    if series == "default":
        return _ws(bed, hosts, numel, None, a)
    if series == "relay":
        return _ws(bed, hosts, numel, "relay", a)
    if series == "direct":
        return _ws(bed, hosts, numel, "distributed", a)
    if series == "torchrl":
        return _torchrl(bed, hosts, numel, a)
    return _chain(bed, hosts, numel * 4, a)


def run(args: argparse.Namespace, log: Any = print) -> dict[str, Any]:
    a = {"warmup": args.warmup, "rounds": args.rounds, "timeout": args.timeout}
    bits = rate_bits(args.rate)
    report: dict[str, Any] = {
        "rate": args.rate, "params": args.params, "small_params": args.small_params,
        "hosts": args.hosts, "series": list(args.series), "rounds": args.rounds,
        "warmup": args.warmup,
        "nbytes": args.params * 4, "wire_s": args.params * 4 * 8 / bits, "rows": []}
    with TestBed(hosts=max(args.hosts) + 1, rate=args.rate) as bed:
        series_all = [s for s in SERIES if s in args.series]
        for i, hosts in enumerate(args.hosts):
            shift = i % len(series_all)
            order = series_all[shift:] + series_all[:shift]
            for params, kind, series_set in ((args.params, "large", order),
                                             (args.small_params, "small",
                                              [s for s in order if s != "tcp_chain"])):
                if not params:
                    continue
                row: dict[str, Any] = {"hosts": hosts, "params": params, "policy": kind,
                                       "order": list(series_set), "wire_s":
                                       params * 4 * 8 / bits, "results": {}}
                for series in series_set:
                    t0 = time.monotonic()
                    try:
                        row["results"][series] = measure(bed, series, hosts, params, a)
                    except (TimeoutError, RuntimeError, OSError) as exc:
                        row["results"][series] = {"error": str(exc)}
                    res = row["results"][series]
                    why = f" {res['error']}" if "error" in res else ""
                    log(f"hosts={hosts} {kind} {series}: "
                        f"{res.get('median_s', float('nan')) * 1e3:.1f} ms"
                        f" ({time.monotonic() - t0:.0f}s){why}")
                report["rows"].append(row)
    return report


_NAMES = {"default": "default", "relay": "relay", "direct": "direct", "torchrl": "torchrl",
          "tcp_chain": "TCP chain"}


def table(report: dict[str, Any], policy: str = "large") -> str:
    """The markdown table of ``report``'s rows for ``policy`` (``"large"``/``"small"``):
    median round ms per series measured, ``bytes / rate``, the learner's time inside
    ``send_weights_async`` and the growth over the fewest hosts for weight-sync's
    ``default`` and ``relay``, and where ``default`` placed the collectors."""
    rows = [r for r in report["rows"] if r["policy"] == policy]
    if not rows:
        return ""
    present = [s for s in SERIES if any(s in r["results"] for r in rows)]
    ws = [s for s in ("default", "relay") if s in present]
    head = (["hosts", *(_NAMES[s] for s in present), "bytes/rate"]
            + [f"{s} async" for s in ws] + [f"{s} / {rows[0]['hosts']}-host {s}" for s in ws]
            + (["default placed on"] if "default" in ws else []))
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    first = next(r for r in rows if r["hosts"] == min(x["hosts"] for x in rows))

    def ratio(row: dict[str, Any], s: str) -> str:
        one = first["results"].get(s, {}).get("median_s")
        v = row["results"].get(s, {}).get("median_s")
        return f"{v / one:.2f}x" if v and one else "—"

    def ms(row: dict[str, Any], s: str, key: str = "median_s") -> str:
        v = row["results"].get(s, {}).get(key)
        return "—" if v is None else f"{v * 1e3:.1f}"

    for r in rows:
        cells = [str(r["hosts"]), *(ms(r, s) for s in present), f"{r['wire_s'] * 1e3:.1f}"]
        cells += [ms(r, s, "async_median_s") for s in ws] + [ratio(r, s) for s in ws]
        if "default" in ws:
            placed = r["results"].get("default", {}).get("placements") or {}
            cells.append(", ".join(f"{k} x{n}" for k, n in sorted(placed.items())) or "—")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, policy in zip(axes, ("large", "small"), strict=True):
        rows = [r for r in report["rows"] if r["policy"] == policy]
        if not rows:
            ax.set_visible(False)
            continue
        xs = [r["hosts"] for r in rows]
        for series in (*SERIES, "wire"):
            ys = [r["wire_s"] if series == "wire" else
                  r["results"].get(series, {}).get("median_s") for r in rows]
            if any(y is not None for y in ys):
                ax.plot(xs, [float("nan") if y is None else y * 1e3 for y in ys], "o-",
                        color=_COLORS[series],
                        label="bytes/rate" if series == "wire" else series)
        ax.set_xlabel("collector hosts")
        ax.set_ylabel("round, ms (median)")
        ax.set_title(f"{rows[0]['params'] / 1e6:g}M params, {report['rate']} links")
        ax.set_xticks(xs)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.fanout", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", type=int, default=25_000_000)
    p.add_argument("--small-params", type=int, default=100_000,
                   help="a small policy for latency (0: skip)")
    p.add_argument("--hosts", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--rate", default="1gbit")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--series", nargs="+", choices=SERIES, default=list(SERIES),
                   help="the series to measure (default: all)")
    p.add_argument("--quick", action="store_true",
                   help="2.5M params, hosts 1 2, 2 rounds (a smoke run)")
    p.add_argument("--results-dir", type=Path, default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    reason = testbed.available()
    if reason is not None:
        print(f"benchmarks.fanout needs the test bed: {reason}", file=sys.stderr)
        return 2
    if args.quick:
        args.params, args.hosts, args.rounds, args.small_params = 2_500_000, [1, 2], 2, 0
    out_dir = args.results_dir or BENCH_DIR / "results" / ("quick" if args.quick else "")
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    report = run(args)
    report["command"] = " ".join(["python -m benchmarks.fanout", *(argv or sys.argv[1:])])
    report["cpus"] = os.cpu_count()
    (out_dir / f"fanout-{stamp}.json").write_text(json.dumps(report, indent=1))
    plot(report, out_dir / f"fanout-{stamp}.png")
    print(table(report, "large"))
    print()
    print(table(report, "small"))
    print(f"\nwrote {out_dir / f'fanout-{stamp}.json'} and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
