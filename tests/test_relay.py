"""``transport="relay"``: the topology (pure), and the relay across simulated hosts —
bit-exact everywhere, a relay killed or cut off mid-transfer, a slow relay demoted to
a leaf, a killed collector rejoining into the tree.

The cross-host tests need the test bed (root, iproute2) and skip without it. Every
child runs under a timeout; the bed kills what is left at the end.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import relay_nodes  # noqa: E402
from test_transports import _can_unshare, _namespaced  # noqa: E402

import testbed  # noqa: E402
from testbed import TestBed  # noqa: E402
from weight_sync import WeightSender  # noqa: E402
from weight_sync.config import RelayConfig  # noqa: E402
from weight_sync.errors import ConfigError  # noqa: E402
from weight_sync.transports.relay_plan import LEARNER, Node, plan  # noqa: E402

REASON = testbed.available()
needs_bed = pytest.mark.skipif(REASON is not None, reason=f"no test bed here: {REASON}")
NODES = str(Path(__file__).resolve().parent / "relay_nodes.py")
PY = sys.executable
WAIT_S = 90.0  # hang guard on a loaded 2-core machine, not a speed claim


# -- the topology ----------------------------------------------------------------------
def nodes(*spec: tuple[int, str]) -> list[Node]:
    return [Node(cid, host) for cid, host in spec]


def test_one_head_per_host_and_heads_in_a_chain() -> None:
    parents = plan(nodes((0, "a"), (1, "a"), (2, "b"), (3, "c"), (4, "b")), fanout=1)
    assert parents == {0: LEARNER, 1: 0, 2: 0, 3: 2, 4: 2}


def test_fanout_makes_a_tree_of_heads() -> None:
    heads = nodes(*[(i, f"h{i}") for i in range(7)])
    assert plan(heads, fanout=2) == {0: LEARNER, 1: LEARNER, 2: 0, 3: 0, 4: 1, 5: 1, 6: 2}


def test_slow_nodes_become_leaves() -> None:
    spec = [Node(0, "a", slow=True), Node(1, "a"), Node(2, "b", slow=True), Node(3, "c")]
    # host a: 1 is its head now; host b has no healthy node: 2 hangs off the last head.
    assert plan(spec, fanout=1) == {1: LEARNER, 0: 1, 3: 1, 2: 3}
    assert plan([Node(0, "a", slow=True)], fanout=1) == {0: LEARNER}


@pytest.mark.parametrize("field, value", [("fanout", 0), ("fanout", 1.5), ("chunk_bytes", 10),
                                          ("stall_s", 0), ("patience_s", -1.0)])
def test_relay_config_quotes_the_bad_value(field: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=repr(value)):
        RelayConfig(**{field: value})


# -- across simulated hosts ------------------------------------------------------------
def start(host: testbed.Host, role: str, args: dict[str, Any]) -> subprocess.Popen[str]:
    # stderr into a file: a chatty child never blocks on a full pipe, and a failure
    # shows its tail.
    with tempfile.NamedTemporaryFile("w+", prefix=f"relay-{role}-", suffix=".err",
                                     delete=False) as err:
        proc = host.popen([PY, NODES, role, json.dumps(args)], stdout=subprocess.PIPE,
                          stdin=subprocess.PIPE, stderr=err, text=True)
    proc.err_path = err.name  # type: ignore[attr-defined]
    return proc


def stderr_tail(proc: subprocess.Popen[str]) -> str:
    name = getattr(proc, "err_path", None)
    if name is None:
        return "(stderr not captured)"
    path = Path(name)
    lines = [ln for ln in path.read_text().splitlines()
             if not ln.startswith(("frame #", "Exception raised"))]
    return "\n".join(lines[-25:])


def line(proc: subprocess.Popen[str]) -> Any:
    """The next JSON (or plain) line of a child's stdout."""
    assert proc.stdout is not None
    text = proc.stdout.readline()
    assert text, f"{proc.args!r} ended (rc {proc.poll()}) without a line"
    return json.loads(text) if text.startswith("{") else text.strip()


def report(proc: subprocess.Popen[str]) -> Any:
    """The last line a child prints before exiting 0."""
    try:
        out, _ = proc.communicate(timeout=WAIT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise AssertionError(f"{proc.args!r} still running after {WAIT_S}s; stderr:\n"
                             f"{stderr_tail(proc)}") from None
    assert proc.returncode == 0, (f"{proc.args!r} exited {proc.returncode}: {out}\n"
                                  f"{stderr_tail(proc)}")
    return json.loads(out.strip().splitlines()[-1])


class Run:
    """A learner on host 0 and collectors placed on hosts."""

    def __init__(self, bed: TestBed, placement: dict[int, int], last: int, numel: int,
                 transport: str = "relay", faults: dict[int, dict[str, Any]] | None = None,
                 **learner: Any) -> None:
        self.bed, self.placement, self.last, self.numel = bed, placement, last, numel
        self.learner = start(bed.hosts[0], "learner", {
            "address": bed.hosts[0].address, "n": len(placement), "last": last,
            "numel": numel, "transport": transport, **learner})
        self.info = line(self.learner)["info"]
        faults = faults or {}
        self.collectors = {cid: self.collector(cid, **faults.get(cid, {}))
                           for cid in placement}

    def collector(self, cid: int, **fault: Any) -> subprocess.Popen[str]:
        host = self.bed.hosts[self.placement[cid]]
        return start(host, "collector", {"info": self.info, "cid": cid, "last": self.last,
                                         "numel": self.numel, **fault})


def assert_exact(result: dict[str, Any], versions: range) -> None:
    assert {int(v) for v in result["exact"]} >= set(versions), result
    assert all(result["exact"].values()), result


@needs_bed
def test_relay_across_hosts_is_bit_exact_with_one_head_per_host() -> None:
    """Five collectors on three hosts: each host's first collector receives from the
    network (heads chained: host 1 from the learner, host 2 from host 1, host 3 from
    host 2), the others copy from their head's shared memory; every version bit-exact
    everywhere, and no collector had to fall back to the learner."""
    placement = {0: 1, 1: 1, 2: 2, 3: 3, 4: 3}
    with TestBed(hosts=4, rate="1gbit") as bed:
        run = Run(bed, placement, last=4, numel=1 << 20)
        results = {cid: report(p) for cid, p in run.collectors.items()}
        learner = report(run.learner)
    for cid, result in results.items():
        assert result["host"] == bed.hosts[placement[cid]].name
        assert result["error"] is None, result
        assert_exact(result, range(run.last + 1))
    assert learner["transports"] == {str(c): "relay" for c in placement}
    assert learner["rounds"][-1]["parents"] == {"0": -1, "1": 0, "2": 0, "3": 2, "4": 3}
    assert learner["fallbacks"] == 0
    versions = run.last + 1
    assert results[0]["fetched"] == {"learner": versions}
    assert results[2]["fetched"] == results[3]["fetched"] == {"socket": versions}
    assert results[1]["fetched"] == results[4]["fetched"] == {"shm": versions}


@needs_bed
def test_a_relay_killed_mid_transfer_is_bypassed_and_rejoins_into_the_tree() -> None:
    """Chain learner → c0 (host 1) → c1 (host 2) → c2 (host 3). c1 freezes halfway
    through version 2 and is SIGKILLed: c2 takes the rest of version 2 from the learner,
    the learner reports c1 failed, and the next versions reach c2 through c0. A new c1
    then joins: it is caught up and placed at the end of the chain."""
    placement = {0: 1, 1: 2, 2: 3}
    with TestBed(hosts=4, rate="1gbit") as bed:
        run = Run(bed, placement, last=4, numel=1 << 22, liveness=3.0, rejoin=True,
                  relay={"stall_s": 1.0}, faults={1: {"freeze_at": 2}})
        victim = run.collectors[1]
        assert line(victim) == "half"
        victim.kill()
        victim.wait(WAIT_S)
        assert line(run.learner) == {"event": "failed", "version": 2, "ids": [1]}
        run.collectors[1] = run.collector(1)
        assert line(run.learner) == {"event": "rejoined", "version": 2, "ids": [1]}
        results = {cid: report(p) for cid, p in run.collectors.items()}
        learner = report(run.learner)
    assert_exact(results[2], range(run.last + 1))
    assert_exact(results[0], range(run.last + 1))
    assert_exact(results[1], range(2, run.last + 1))
    assert learner["fallbacks"] >= 1
    rounds = {r["version"]: r for r in learner["rounds"]}
    assert rounds[2]["failed"] == [1]
    assert rounds[4]["acked"] == [0, 1, 2]
    assert rounds[4]["parents"] == {"0": -1, "2": 0, "1": 2}


@needs_bed
@pytest.mark.slow
def test_a_relay_host_cut_off_mid_transfer() -> None:
    """c1's host loses its link halfway through version 2: c2 takes the rest from the
    learner and gets every version; the learner reports c1 failed (no heartbeat); c1
    itself ends with ``PeerGone`` (its parent and the learner are unreachable)."""
    placement = {0: 1, 1: 2, 2: 3}
    with TestBed(hosts=4, rate="1gbit") as bed:
        run = Run(bed, placement, last=4, numel=1 << 22, liveness=3.0,
                  relay={"stall_s": 1.0}, faults={1: {"freeze_at": 2}})
        victim = run.collectors[1]
        assert line(victim) == "half"
        bed.cut(2)
        assert victim.stdin is not None
        victim.stdin.write("go\n")
        victim.stdin.flush()
        cut_off = line(victim)  # its report; closing its receiver is not timed here
        victim.kill()
        results = {cid: report(run.collectors[cid]) for cid in (0, 2)}
        learner = report(run.learner)
    assert cut_off["error"] == "PeerGone", cut_off
    assert_exact(results[2], range(run.last + 1))
    rounds = {r["version"]: r for r in learner["rounds"]}
    assert rounds[2]["failed"] == [1]
    assert rounds[4]["acked"] == [0, 2]


@needs_bed
@pytest.mark.slow
def test_a_slow_relay_becomes_a_leaf() -> None:
    """c1 (host 2) receives at 2 MB/s while its link allows far more: c2 below it gives
    up on it after ``patience_s``, takes that version from the learner, and from then
    on c1 is a leaf (at the end of the chain) and c2 receives from c0."""
    placement = {0: 1, 1: 2, 2: 3}
    with TestBed(hosts=4, rate="1gbit") as bed:
        run = Run(bed, placement, last=3, numel=1 << 20,
                  relay={"stall_s": 1.0, "patience_s": 1.0}, faults={1: {"slow_bps": 2e6}})
        results = {cid: report(p) for cid, p in run.collectors.items()}
        learner = report(run.learner)
    for result in results.values():
        assert_exact(result, range(run.last + 1))
    assert learner["fallbacks"] >= 1
    last = learner["rounds"][-1]
    assert last["slow"] == [1]
    assert last["parents"] == {"0": -1, "2": 0, "1": 2}


@needs_bed
@pytest.mark.slow
def test_the_fanout_benchmark_runs_every_series_and_checks_the_weights(tmp_path: Path) -> None:
    """``python -m benchmarks.fanout --quick``: one and two hosts, every series measured
    (no timing asserted), every collector's weights equal to the learner's."""
    done = subprocess.run([PY, "-m", "benchmarks.fanout", "--quick", "--results-dir",
                           str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    [result] = tmp_path.glob("fanout-*.json")
    assert result.with_suffix(".png").exists()
    report_ = json.loads(result.read_text())
    assert [r["hosts"] for r in report_["rows"]] == [1, 2]
    for row in report_["rows"]:
        assert set(row["results"]) == {"default", "relay", "direct", "torchrl", "tcp_chain"}, row
        for series, res in row["results"].items():
            assert "error" not in res, (series, res)
            assert len(res["rounds_s"]) == report_["rounds"]
            if series != "tcp_chain":
                assert res["correct"] is True, (series, res)
    assert "| 2 |" in done.stdout


def test_a_neighbour_without_the_hosts_dev_shm_takes_the_bytes_instead() -> None:
    """Two collectors on this host with the same hostname, the second in its own mount
    namespace (its own ``/dev/shm``): told its parent is local, it cannot open the
    parent's segment and takes the parent's bytes over the socket; both bit-exact."""
    reason = _can_unshare()
    if reason:
        pytest.skip(reason)
    numel, last = 1 << 16, 3
    weights = relay_nodes.weights_at(0, numel)
    with WeightSender(weights, 2, transport="relay", timeout=30) as tx:
        def argv(cid: int) -> list[str]:
            return [PY, NODES, "collector", json.dumps(
                {"info": tx.connection_info.to_json(), "cid": cid, "numel": numel})]

        children = [subprocess.Popen(argv(0), stdout=subprocess.PIPE, text=True),
                    subprocess.Popen(_namespaced(argv(1)), stdout=subprocess.PIPE, text=True)]
        try:
            tx.connect(timeout=90)
            for version in range(1, last + 1):
                relay_nodes.set_version(weights, version)
                tx.send_weights_async()
                assert tx.wait_ack(timeout=30).acked == (0, 1)
            assert tx.learner_side("relay").parents() == {0: LEARNER, 1: 0}  # type: ignore[attr-defined]
            tx.close()
            results = [report(child) for child in children]
        finally:
            for child in children:
                child.kill()
                child.wait(WAIT_S)
    for result in results:
        assert_exact(result, range(last + 1))
    assert results[0]["fetched"] == {"learner": last + 1}
    assert results[1]["fetched"] == {"socket": last + 1}
