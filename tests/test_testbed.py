"""The multi-host test bed (``testbed/``): isolation between simulated hosts, shaped
links, faults, teardown on every path, removal of a killed bed's leftovers, and
weight-sync across hosts (shared memory only where ``/dev/shm`` is really shared).

Needs root and iproute2; skipped with :func:`testbed.available`'s reason otherwise.
Every child runs under a timeout and is killed by the bed (or the test) at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # a checkout package, like benchmarks/
    sys.path.insert(0, str(ROOT))

import testbed  # noqa: E402
from testbed import TestBed, TestBedError  # noqa: E402
from testbed._system import remove_leftovers  # noqa: E402

REASON = testbed.available()
needs_bed = pytest.mark.skipif(REASON is not None, reason=f"no test bed here: {REASON}")
DELAY_REASON = testbed.available(delay=True)
PY = sys.executable
TESTS = Path(__file__).resolve().parent
WAIT_S = 30.0  # hang guard on a loaded 2-core machine, not a speed claim

# One helper script for the network checks, run on the hosts.
TOOLS = r'''
import errno, json, os, selectors, signal, socket, subprocess, sys, time

def sink(address, conns):
    """Print the port, take `conns` streams, report bytes and seconds first-to-last."""
    srv = socket.create_server((address, 0))
    print(srv.getsockname()[1], flush=True)
    sel = selectors.DefaultSelector()
    sel.register(srv, selectors.EVENT_READ)
    total, first, done = 0, None, 0
    while done < int(conns):
        events = sel.select(timeout=30)
        if not events:
            sys.exit("sink: nothing for 30 s")
        for key, _ in events:
            if key.fileobj is srv:
                sel.register(srv.accept()[0], selectors.EVENT_READ)
                continue
            data = key.fileobj.recv(1 << 20)
            if data:
                first = time.monotonic() if first is None else first
                total += len(data)
            else:
                sel.unregister(key.fileobj)
                key.fileobj.close()
                done += 1
    print(json.dumps({"bytes": total, "seconds": time.monotonic() - first}), flush=True)

def source(address, port, nbytes):
    with socket.create_connection((address, int(port)), timeout=10) as s:
        chunk, left = bytes(1 << 20), int(nbytes)
        while left > 0:
            s.sendall(chunk[:left])
            left -= len(chunk)

def echo(address):
    """Print the port, then echo one message per connection, forever."""
    srv = socket.create_server((address, 0))
    print(srv.getsockname()[1], flush=True)
    while True:
        conn = srv.accept()[0]
        with conn:
            conn.sendall(conn.recv(1024))

def connect(address, port, timeout, payload=""):
    start = time.monotonic()
    try:
        with socket.create_connection((address, int(port)), timeout=float(timeout)) as s:
            seconds = time.monotonic() - start
            echoed = ""
            if payload:
                s.sendall(payload.encode())
                echoed = s.recv(1024).decode()
        print(json.dumps({"ok": True, "seconds": seconds, "echo": echoed}))
    except OSError as exc:
        print(json.dumps({"ok": False, "error": type(exc).__name__,
                          "errno": errno.errorcode.get(exc.errno or 0, "")}))

def victim():
    """Start a child in a session of its own, print both pids, wait forever."""
    child = subprocess.Popen([sys.executable, "-c", "import signal; signal.pause()"],
                             start_new_session=True)
    print(os.getpid(), child.pid, flush=True)
    signal.pause()

globals()[sys.argv[1]](*sys.argv[2:])
'''

# A process that owns a bed with two processes on host 0, then waits for a signal.
BED_OWNER = r'''
import json, signal, subprocess, sys
sys.path.insert(0, sys.argv[1])
import testbed
# Started from a background shell job, this process inherits SIGINT ignored (and Python
# then installs no KeyboardInterrupt handler): what a user at a terminal gets, explicitly.
signal.signal(signal.SIGINT, signal.default_int_handler)
with testbed.TestBed(hosts=2, rate=None) as bed:
    victim = bed.hosts[0].popen([sys.executable, sys.argv[2], "victim"],
                                stdout=subprocess.PIPE, text=True)
    pids = [int(p) for p in victim.stdout.readline().split()]
    print(json.dumps({"prefix": bed.prefix, "tmp": bed.tmpdir, "pids": pids}), flush=True)
    signal.pause()
'''

LEARNER = r'''
import json, sys
sys.path.insert(0, sys.argv[1])
import torch
torch.set_num_threads(1)
import weight_sync
from versioned import make_weights, set_version
address, n, last = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
weights = make_weights(0)
with weight_sync.WeightSender(weights, n, host=address, transport="shm", timeout=30) as tx:
    print(json.dumps({"info": tx.connection_info.to_json()}), flush=True)
    tx.connect(timeout=60)
    for version in range(1, last + 1):
        set_version(weights, version)
        assert tx.send_weights_async() == version
        assert tx.wait_ack(timeout=30).complete
    print(json.dumps({"transports": tx.transports, "version": tx.version}), flush=True)
'''

COLLECTOR = r'''
import json, socket, sys, time
sys.path.insert(0, sys.argv[1])
import torch
torch.set_num_threads(1)
import weight_sync
from versioned import expected, fingerprint, make_weights
info = weight_sync.ConnectionInfo.from_json(sys.argv[2])
cid, last = int(sys.argv[3]), int(sys.argv[4])
weights = make_weights(-7)
exact = {}
with weight_sync.WeightReceiver(weights, info, cid, timeout=30) as rx:
    version = rx.connect(timeout=60)
    exact[version] = fingerprint(weights) == expected(version)
    deadline = time.monotonic() + 60
    while version < last and time.monotonic() < deadline:
        got = rx.receive_weights(timeout=5)
        if got is not None:
            version = got
            exact[version] = fingerprint(weights) == expected(version)
    print(json.dumps({"cid": cid, "host": socket.gethostname(), "transport": rx.transport,
                      "exact": exact}), flush=True)
'''


# -- helpers ---------------------------------------------------------------------------
@pytest.fixture
def tools(tmp_path: Path) -> str:
    path = tmp_path / "tools.py"
    path.write_text(TOOLS)
    return str(path)


def first_line(proc: subprocess.Popen[Any], timeout: float = WAIT_S) -> str:
    """A child's first line of stdout (unbuffered read: nothing after it is lost)."""
    assert proc.stdout is not None
    fd, data = proc.stdout.fileno(), b""
    while not data.endswith(b"\n"):
        ready = select.select([fd], [], [], timeout)[0]
        assert ready, f"no line from {proc.args!r} within {timeout}s"
        byte = os.read(fd, 1)
        assert byte, f"{proc.args!r} exited (rc {proc.wait(WAIT_S)}) before a line"
        data += byte
    return data.decode()


def finish(proc: subprocess.Popen[Any], timeout: float = WAIT_S) -> str:
    """The rest of a child's stdout once it exits successfully (killed after timeout)."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    text = out.decode() if isinstance(out, bytes) else out
    assert proc.returncode == 0, f"{proc.args!r} exited {proc.returncode}: {text}"
    return text


def run_json(host: testbed.Host, argv: list[str], timeout: float = WAIT_S) -> Any:
    done = host.run(argv, timeout=timeout, check=True)
    return json.loads(done.stdout)


def bed_namespaces(prefix: str) -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                         timeout=10, check=True).stdout
    return [line.split()[0] for line in out.splitlines()
            if line.startswith(prefix + "-")]


def alive(pid: int) -> bool:
    """Running (an exited, unreaped process counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


@pytest.fixture
def bed_owner(tmp_path: Path, tools: str
              ) -> Iterator[tuple[subprocess.Popen[bytes], dict[str, Any]]]:
    """A process holding a 2-host bed (and a victim on it), with what it made. Killed,
    reaped and its bed removed after the test whatever the test asserted."""
    script = tmp_path / "bed_owner.py"
    script.write_text(BED_OWNER)
    owner = subprocess.Popen([PY, str(script), str(ROOT), tools], stdout=subprocess.PIPE,
                             start_new_session=True)
    try:
        yield owner, json.loads(first_line(owner))
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(owner.pid, signal.SIGKILL)
        owner.wait(WAIT_S)
        assert owner.stdout is not None
        owner.stdout.close()
        remove_leftovers()  # its namespaces and victims, its owner now dead


# -- availability ----------------------------------------------------------------------
def test_available_names_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(testbed.support.os, "geteuid", lambda: 1000)
    assert "root" in (testbed.available() or "")
    monkeypatch.setattr(testbed.support.os, "geteuid", lambda: 0)
    real = testbed.support.shutil.which
    monkeypatch.setattr(testbed.support.shutil, "which",
                        lambda name: None if name == "ip" else real(name))
    assert "iproute2" in (testbed.available() or "")


# -- isolation -------------------------------------------------------------------------
@needs_bed
def test_hosts_have_their_own_hostname_and_dev_shm() -> None:
    name = f"wsbed-test-{uuid.uuid4().hex}"
    with TestBed(hosts=3, rate=None) as bed:
        names = [h.run(["hostname"], timeout=WAIT_S, check=True).stdout.strip()
                 for h in bed.hosts]
        assert names == [h.name for h in bed.hosts] == ["host0", "host1", "host2"]
        assert socket.gethostname() not in names
        a, b = bed.hosts[0], bed.hosts[1]
        a.run(["sh", "-c", f"echo secret > /dev/shm/{name}"], timeout=WAIT_S, check=True)
        # Processes of one host share its /dev/shm (what the shm transport relies on) ...
        assert a.run(["cat", f"/dev/shm/{name}"], timeout=WAIT_S).stdout == "secret\n"
        # ... no other host, nor the real machine, sees it.
        assert b.run(["test", "-e", f"/dev/shm/{name}"], timeout=WAIT_S).returncode == 1
        assert not os.path.exists(f"/dev/shm/{name}")
        # The hosts resolve each other by name.
        resolved = b.run([PY, "-c", "import socket; print(socket.gethostbyname('host0'))"],
                         timeout=WAIT_S, check=True).stdout.strip()
        assert resolved == a.address
    assert not os.path.exists(f"/dev/shm/{name}")


@needs_bed
def test_hosts_reach_each_other_and_nothing_else(tools: str) -> None:
    outside = socket.create_server(("127.0.0.1", 0))  # a service of the real machine
    with outside, TestBed(hosts=2, rate="1gbit") as bed:
        a, b = bed.hosts
        server = b.popen([PY, tools, "echo", b.address], stdout=subprocess.PIPE)
        port = int(first_line(server))
        reply = run_json(a, [PY, tools, "connect", b.address, str(port), "5", "ping"])
        assert reply == {"ok": True, "seconds": reply["seconds"], "echo": "ping"}

        here = outside.getsockname()[1]
        socket.create_connection(("127.0.0.1", here), timeout=5).close()  # it listens ...
        reply = run_json(a, [PY, tools, "connect", "127.0.0.1", str(here), "2"])
        assert reply["error"] == "ConnectionRefusedError"  # ... but not on a host's loopback
        routes = a.run(["ip", "-4", "route", "show"], timeout=WAIT_S, check=True).stdout
        assert routes.split("\n")[0].startswith("10.213.0.0/24 dev eth0")
        assert len(routes.strip().splitlines()) == 1  # no default route: nowhere else
        reply = run_json(a, [PY, tools, "connect", "192.0.2.1", "9", "2"])  # TEST-NET-1
        assert reply["errno"] == "ENETUNREACH"
    assert server.poll() is not None  # the bed killed the echo server


@needs_bed
def test_links_are_shaped_both_ways(tools: str) -> None:
    rate = 100e6 / 8  # bytes/s of "100mbit"
    with TestBed(hosts=3, rate="100mbit") as bed:
        sink_host = bed.hosts[0]
        # One stream host1 -> host0, then two at once into host0: its downlink is the
        # bottleneck, so the two together get one link's rate, not two.
        for senders, nbytes in (([1], 8 << 20), ([1, 2], 4 << 20)):
            sink = sink_host.popen([PY, tools, "sink", sink_host.address, str(len(senders))],
                                   stdout=subprocess.PIPE)
            port = first_line(sink).strip()
            sources = [bed.hosts[i].popen([PY, tools, "source", sink_host.address, port,
                                           str(nbytes)]) for i in senders]
            for proc in sources:
                assert proc.wait(WAIT_S) == 0
            got = json.loads(finish(sink))
            assert got["bytes"] == nbytes * len(senders)
            goodput = got["bytes"] / got["seconds"]
            # A tbf bucket (512 KB) goes out at once; the rest at the rate.
            assert goodput < 1.25 * rate, (senders, goodput / rate)


@pytest.mark.skipif(DELAY_REASON is not None, reason=f"no delay here: {DELAY_REASON}")
def test_delay_adds_to_the_round_trip(tools: str) -> None:
    with TestBed(hosts=2, rate="1gbit", delay_ms=20) as bed:
        a, b = bed.hosts
        server = b.popen([PY, tools, "echo", b.address], stdout=subprocess.PIPE)
        port = first_line(server).strip()
        reply = run_json(a, [PY, tools, "connect", b.address, port, "5"])
        assert reply["ok"] and reply["seconds"] >= 4 * 0.020  # SYN out and back: 4 links


@needs_bed
@pytest.mark.skipif(DELAY_REASON is None, reason="netem is there: delay works")
def test_delay_without_netem_is_refused_clearly() -> None:
    bed = TestBed(hosts=1, delay_ms=5)
    with pytest.raises(TestBedError, match="netem"):
        bed.start()
    assert bed_namespaces(bed.prefix) == []


@needs_bed
def test_cut_restore_and_flap(tools: str) -> None:
    with TestBed(hosts=2, rate="1gbit") as bed:
        a, b = bed.hosts
        server = b.popen([PY, tools, "echo", b.address], stdout=subprocess.PIPE)
        port = first_line(server).strip()

        def reach() -> dict[str, Any]:
            return dict(run_json(a, [PY, tools, "connect", b.address, port, "1", "hi"]))

        assert reach()["ok"]
        bed.cut(1)
        assert not reach()["ok"]
        cut_off = run_json(b, [PY, tools, "connect", a.address, "9", "1"])
        assert cut_off["errno"] == "ENETUNREACH"  # the cut host has no route at all
        bed.restore(1)
        assert reach()["echo"] == "hi"
        timer = bed.flap(1, 2.0)
        state = b.run(["cat", "/sys/class/net/eth0/operstate"], timeout=WAIT_S).stdout
        assert state.strip() == "down"
        timer.join(WAIT_S)
        assert reach()["echo"] == "hi"


# -- teardown --------------------------------------------------------------------------
@needs_bed
@pytest.mark.parametrize("raises", [False, True], ids=["clean", "raising"])
def test_teardown_removes_everything(tools: str, raises: bool) -> None:
    bed = TestBed(hosts=2, rate="1gbit")
    pids: list[int] = []
    try:
        with bed:
            assert sorted(bed_namespaces(bed.prefix)) == sorted(bed.namespaces)
            for host in bed.hosts:
                victim = host.popen([PY, tools, "victim"], stdout=subprocess.PIPE)
                pids += [int(p) for p in first_line(victim).split()]
            assert all(alive(p) for p in pids)
            if raises:
                raise KeyError("boom")
    except KeyError:
        assert raises
    assert bed_namespaces(bed.prefix) == []
    assert [p for p in pids if alive(p)] == []  # children in sessions of their own too
    assert all(p.returncode is not None for p in bed.processes)
    assert bed.tmpdir is not None and not os.path.exists(bed.tmpdir)


@needs_bed
def test_a_failed_build_leaves_nothing() -> None:
    bed = TestBed(hosts=2, rate="not-a-rate")
    with pytest.raises(TestBedError, match="tc"):
        bed.start()
    assert bed_namespaces(bed.prefix) == []


@needs_bed
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL],
                         ids=["SIGINT", "SIGTERM", "SIGKILL"])
def test_a_signalled_bed_is_removed(
        bed_owner: tuple[subprocess.Popen[bytes], dict[str, Any]], sig: int) -> None:
    owner, made = bed_owner
    prefix, pids = made["prefix"], made["pids"]
    assert len(bed_namespaces(prefix)) == 3 and all(alive(p) for p in pids)
    os.kill(owner.pid, sig)
    assert owner.wait(WAIT_S) == -sig
    if sig != signal.SIGKILL:  # torn down on the way out
        assert bed_namespaces(prefix) == []
        assert [p for p in pids if alive(p)] == []
        return
    # SIGKILL: nothing could run; the next bed's start removes what is left.
    assert len(bed_namespaces(prefix)) == 3 and all(alive(p) for p in pids)
    with TestBed(hosts=1, rate=None) as bed:
        assert bed_namespaces(prefix) == []
        assert [p for p in pids if alive(p)] == []
        assert not os.path.exists(made["tmp"])
        assert sorted(bed_namespaces(bed.prefix)) == sorted(bed.namespaces)


# -- weight-sync across hosts ----------------------------------------------------------
@needs_bed
@pytest.mark.timeout(120)
def test_weight_sync_across_hosts(tmp_path: Path) -> None:
    """A learner on host 0, collectors 0 and 1 on hosts 1 and 2, collector 2 next to
    the learner on host 0: three versions arrive bit-exact everywhere; shared memory
    only on host 0 (the others cannot read the learner's /dev/shm token)."""
    learner_py, collector_py = tmp_path / "learner.py", tmp_path / "collector.py"
    learner_py.write_text(LEARNER)
    collector_py.write_text(COLLECTOR)
    last, placement = 3, {0: 1, 1: 2, 2: 0}  # collector id -> host
    with TestBed(hosts=3, rate="1gbit") as bed:
        home = bed.hosts[0]
        learner = home.popen([PY, str(learner_py), str(TESTS), home.address,
                              str(len(placement)), str(last)], stdout=subprocess.PIPE)
        head = first_line(learner, 60)
        info = json.loads(head)["info"]
        collectors = [bed.hosts[h].popen([PY, str(collector_py), str(TESTS), info, str(cid),
                                          str(last)], stdout=subprocess.PIPE)
                      for cid, h in placement.items()]
        reports = [json.loads(finish(c, 90)) for c in collectors]
        result = json.loads(finish(learner, 30))
    assert result["version"] == last
    assert result["transports"] == {"0": "distributed", "1": "distributed", "2": "shm"}
    for report in reports:
        cid = report["cid"]
        assert report["host"] == bed.hosts[placement[cid]].name
        assert report["transport"] == result["transports"][str(cid)]
        assert report["exact"] == {str(v): True for v in range(last + 1)}, report


# -- the learner's liveness across a cut link ------------------------------------------
PARKED_LEARNER = r'''
import json, sys
sys.path.insert(0, sys.argv[1])
import torch
torch.set_num_threads(1)
import weight_sync
from versioned import make_weights, set_version
weights = make_weights(0)
with weight_sync.WeightSender(weights, 1, host=sys.argv[2], timeout=30) as tx:
    print(json.dumps({"info": tx.connection_info.to_json()}), flush=True)
    tx.connect(timeout=60)
    set_version(weights, 1)
    tx.send_weights_async()
    tx.wait_ack(timeout=30)
    print(json.dumps({"acked": 1}), flush=True)
    sys.stdin.read()  # parked until the test closes stdin or the bed kills it
'''

CUT_OFF_COLLECTOR = r'''
import json, sys, time
sys.path.insert(0, sys.argv[1])
import torch
torch.set_num_threads(1)
import weight_sync
from versioned import expected, fingerprint, make_weights
info = weight_sync.ConnectionInfo.from_json(sys.argv[2])
weights = make_weights(-7)
rx = weight_sync.WeightReceiver(weights, info, 0, timeout=30)
rx.connect(timeout=60)
while rx.version < 1:
    rx.receive_weights(timeout=5)
print(json.dumps({"applied": rx.version}), flush=True)
try:
    while True:
        rx.receive_weights(timeout=1)
except weight_sync.WeightSyncError as exc:
    error, message = type(exc).__name__, str(exc)
start = time.monotonic()
rx.close()
print(json.dumps({"error": error, "message": message, "close_s": time.monotonic() - start,
                  "exact": fingerprint(weights) == expected(1)}), flush=True)
'''


@needs_bed
@pytest.mark.timeout(120)
def test_collector_cut_off_from_the_learner_raises_peer_gone(tmp_path: Path) -> None:
    """The collector's host link goes down after version 1: no socket closes, no store
    call returns; ``receive_weights`` raises ``PeerGone`` within ``learner_timeout``
    (10 s) instead of the store's 30 s timeout, the weights stay version 1, and the
    process exits."""
    learner_py, collector_py = tmp_path / "learner.py", tmp_path / "collector.py"
    learner_py.write_text(PARKED_LEARNER)
    collector_py.write_text(CUT_OFF_COLLECTOR)
    with TestBed(hosts=2, rate="1gbit") as bed:
        home, away = bed.hosts
        learner = home.popen([PY, str(learner_py), str(TESTS), home.address],
                             stdout=subprocess.PIPE, stdin=subprocess.PIPE)
        info = json.loads(first_line(learner, 60))["info"]
        collector = away.popen([PY, str(collector_py), str(TESTS), info],
                               stdout=subprocess.PIPE)
        assert json.loads(first_line(collector, 90)) == {"applied": 1}
        assert json.loads(first_line(learner, 30)) == {"acked": 1}
        bed.cut(1)
        cut = time.monotonic()
        report = json.loads(first_line(collector, 60))
        seen = time.monotonic() - cut
        finish(collector, 30)
    assert report["error"] == "PeerGone", report
    assert "no sign of life from the learner" in report["message"], report
    assert report["exact"], "weights changed after the cut"
    print(f"cut link: PeerGone {seen:.2f}s after the cut (report line included); "
          f"close() {report['close_s']:.2f}s")
