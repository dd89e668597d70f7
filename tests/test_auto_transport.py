"""``transport="auto"``, the default: each collector placed on the best transport it can
prove (shared memory on the learner's host, the relay on other hosts, direct sends
otherwise), a ``/dev/shm`` that can never crash a process, checksums only where bytes
cross a host, and stats per placement.

In-process collectors (threads) prove or fail the proofs as a test decides: a collector
thread named ``remote-...`` cannot read the learner's shared-memory token, as on another
host. The small-``/dev/shm`` cases run in a mount namespace with a small tmpfs; the
mixed run across simulated hosts needs the test bed (both need root, and skip without).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from test_integrity import Flipper
from test_relay import WAIT_S, assert_exact, line, report
from test_transports import _can_unshare
from versioned import RX_TIMEOUT_S, expected, fingerprint, make_weights, publish

import testbed
import weight_sync.collector.receiver_link as receiver_link
import weight_sync.transports.relay_receiver as relay_receiver
import weight_sync.transports.shm_receiver as shm_receiver
from testbed import TestBed
from weight_sync import SenderConfig, WeightReceiver, WeightSender
from weight_sync.collector.hooks import ReceiverHooks
from weight_sync.errors import ConfigError
from weight_sync.transports import TransportSpec, register_transport
from weight_sync.transports.registry import sender_chain
from weight_sync.wire import shm

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(180)


# -- the proposal --------------------------------------------------------------------
def test_auto_is_the_default_and_keeps_what_the_settings_allow() -> None:
    def names(**kw: Any) -> list[str]:
        return [spec.name for spec in sender_chain(SenderConfig(**kw))]

    assert SenderConfig().transport == "auto"
    assert names() == ["shm", "relay", "distributed"]
    assert names(changed_only=True) == ["distributed"]  # one message per collector
    assert names(backend="nccl") == ["distributed"]  # shm and relay are CPU only
    assert names(transport="distributed") == ["distributed"]  # forced: as before
    assert names(transport="shm") == ["shm", "distributed"]
    assert names(transport="relay") == ["relay"]


def test_auto_is_no_transport_name() -> None:
    with pytest.raises(ConfigError, match="'auto' is reserved"):
        register_transport(TransportSpec("auto", sender=object, receiver=object))  # type: ignore[arg-type]


# -- in-process collectors -----------------------------------------------------------
@pytest.fixture
def remote_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Collector threads named ``remote-*``, and the threads they start (named after
    them), cannot read the learner's token (another host's ``/dev/shm``, as far as the
    proof goes)."""
    real = shm_receiver.read_token

    def read_token(name: str) -> str | None:
        return None if "remote" in threading.current_thread().name else real(name)

    monkeypatch.setattr(shm_receiver, "read_token", read_token)


@pytest.fixture
def checks(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the collector threads that checked a payload checksum."""
    seen: list[str] = []
    real = receiver_link.check_payload

    def check_payload(data: torch.Tensor, who: str, computed: int | None = None) -> None:
        seen.append(who)
        real(data, who, computed)

    monkeypatch.setattr(receiver_link, "check_payload", check_payload)
    return seen


@contextlib.contextmanager
def run(local: int, remote: int, hooks: dict[int, ReceiverHooks] | None = None,
        **sender_kw: Any) -> Iterator[tuple[WeightSender, list[WeightReceiver],
                                            list[dict[str, torch.Tensor]],
                                            dict[str, torch.Tensor]]]:
    """A default sender and ``local`` + ``remote`` receivers (ids in that order; ``hooks``
    by id), connected at version 0; everything closed afterwards."""
    weights = make_weights(0)
    policies = [make_weights(-7) for _ in range(local + remote)]
    with WeightSender(weights, local + remote, timeout=RX_TIMEOUT_S, **sender_kw) as sender:
        rxs = [WeightReceiver(p, sender.connection_info, i, timeout=RX_TIMEOUT_S,
                              hooks=(hooks or {}).get(i)) for i, p in enumerate(policies)]
        try:
            with ThreadPoolExecutor(max(local, 1), thread_name_prefix="local") as near, \
                    ThreadPoolExecutor(max(remote, 1), thread_name_prefix="remote") as far:
                joined = [(near if i < local else far).submit(rx.connect, 60)
                          for i, rx in enumerate(rxs)]
                sender.connect(timeout=60)
                assert [j.result(60) for j in joined] == [0] * len(rxs)
            yield sender, rxs, policies, weights
        finally:
            for rx in rxs:
                rx.close()


def sync(sender: WeightSender, rxs: list[WeightReceiver], weights: dict[str, torch.Tensor],
         policies: list[dict[str, torch.Tensor]]) -> int:
    """Publish one version; every receiver applies it, bit-exact."""
    v = publish(sender, weights)
    with ThreadPoolExecutor(len(rxs)) as pool:
        got = [pool.submit(rx.receive_weights, timeout=60) for rx in rxs]
        assert sender.wait_ack(timeout=60).complete
        assert [g.result(60) for g in got] == [v] * len(rxs)
    assert [fingerprint(p) for p in policies] == [expected(v)] * len(policies)
    return v


def test_collectors_on_the_learners_host_get_shm_and_check_no_checksum(
        checks: list[str], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="weight_sync.learner.admission")
    with run(2, 0) as (sender, rxs, policies, weights):
        assert sender.transports == {0: "shm", 1: "shm"}
        assert [rx.transport for rx in rxs] == ["shm", "shm"]
        for _ in range(3):
            sync(sender, rxs, weights, policies)
        stats = sender.stats.by_placement()
    assert checks == []
    assert "over 'shm': 'shm': its probe proved it (token)" in caplog.text
    assert set(stats) == {"shm"} and stats["shm"]["collectors"] == 2
    assert stats["shm"]["p50_s"] > 0 and stats["shm"]["gbps_median"] > 0


def test_without_room_in_dev_shm_a_same_host_collector_gets_direct_sends_unchecked(
        monkeypatch: pytest.MonkeyPatch, checks: list[str],
        caplog: pytest.LogCaptureFixture) -> None:
    """The learner checks ``/dev/shm`` has room for the snapshots' bound before placing
    a collector on shared memory; without, the next transport, and the log says so. The
    collector is still proven to share the host: it checks no checksum."""
    import weight_sync.learner.placement as placement_module

    monkeypatch.setattr(placement_module, "shm_room", lambda: 1000)
    caplog.set_level(logging.INFO, logger="weight_sync.learner.admission")
    with run(1, 0) as (sender, rxs, policies, weights):
        assert sender.transports == {0: "distributed"}
        assert sender.links[0].local and not sender.links[0].verifies
        sync(sender, rxs, weights, policies)
        assert sender._publisher.pool.shared_bytes == 0  # nothing put in /dev/shm
    assert checks == []
    assert "not 'shm': /dev/shm has 0.0 MB free" in caplog.text
    assert "not 'relay': the collector shares the learner's host" in caplog.text


@pytest.mark.usefixtures("remote_threads")
def test_a_lone_collector_off_the_host_gets_direct_sends_and_verifies(
        checks: list[str]) -> None:
    """One collector off the learner's host: direct sends (the relay costs more for a
    single one); it checks every checksum, and a corrupted message is refused and sent
    again."""
    flipper = Flipper(times=1)
    with run(0, 1, {0: ReceiverHooks(after_receive=flipper)}) as (sender, rxs, policies, weights):
        assert sender.transports == {0: "distributed"}
        assert not sender.links[0].local
        for _ in range(2):
            sync(sender, rxs, weights, policies)
        assert rxs[0].refused == 2 and flipper.flipped == {1: 1, 2: 1}
    assert checks  # the cross-host collector verified


@pytest.mark.usefixtures("remote_threads")
def test_mixed_placements_in_one_run(checks: list[str], caplog: pytest.LogCaptureFixture
                                     ) -> None:
    """One collector on the learner's host (shm) and two off it (the relay), in one
    run: every version bit-exact everywhere, the same-host one unchecked, the others
    verifying (a corrupted delivery refused and sent again), stats per placement."""
    caplog.set_level(logging.INFO)
    hooks = {i: ReceiverHooks(after_receive=Flipper(times=1)) for i in (1, 2)}
    with run(1, 2, hooks) as (sender, rxs, policies, weights):
        assert sender.transports == {0: "shm", 1: "relay", 2: "relay"}
        assert {c: link.local for c, link in sender.links.items()} == {
            0: True, 1: False, 2: False}
        for _ in range(3):
            sync(sender, rxs, weights, policies)
        assert rxs[1].refused == rxs[2].refused == 3
        summary = sender.stats.summary()
    assert checks and all("collector 0 " not in who for who in checks)
    assert summary["shm_collectors"] == 1 and summary["relay_collectors"] == 2
    assert summary["relay_p50_s"] > 0 and summary["relay_gbps_median"] > 0
    assert "over 'relay': 'relay': its probe proved it (reached)" in caplog.text
    assert "heads its host" in caplog.text and "from its host's head, collector" in caplog.text


@pytest.mark.usefixtures("remote_threads")
def test_a_relay_out_of_reach_places_on_direct_sends(monkeypatch: pytest.MonkeyPatch
                                                     ) -> None:
    def unreachable(*args: Any, **kw: Any) -> Any:
        raise ConnectionRefusedError("firewalled (test)")

    monkeypatch.setattr(relay_receiver.socket, "create_connection", unreachable)
    with run(0, 2) as (sender, rxs, policies, weights):
        assert sender.transports == {0: "distributed", 1: "distributed"}
        sync(sender, rxs, weights, policies)


def test_forcing_a_transport_keeps_it(checks: list[str]) -> None:
    """A forced ``"distributed"`` makes no shared-memory offer: no proof of the host,
    so its collectors verify, as before ``"auto"``."""
    with run(1, 0, transport="distributed") as (sender, rxs, policies, weights):
        assert sender.transports == {0: "distributed"}
        assert sender.links[0].verifies
        sync(sender, rxs, weights, policies)
    assert checks


# -- /dev/shm --------------------------------------------------------------------------
def _tokens() -> set[str]:
    return {n for n in os.listdir(shm.SHM_DIR) if n.startswith("ws-token-")}


_LEARNER = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {tests!r})
    from versioned import make_weights
    from weight_sync import WeightSender
    tx = WeightSender(make_weights(0), 1)
    print(tx._placements.offers["shm"].params["token_file"], flush=True)
    sys.stdin.readline()
""")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_the_token_file_goes_with_a_killed_learner(sig: signal.Signals) -> None:
    """Its resource tracker removes it when the learner dies (P8)."""
    script = _LEARNER.format(tests=str(ROOT / "tests"))
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        token = proc.stdout.readline().strip()
        assert token in _tokens()
        proc.send_signal(sig)
        proc.wait(30)
        # The tracker notices the learner's end as its pipe closes, then unlinks.
        with contextlib.suppress(subprocess.TimeoutExpired):
            subprocess.run(["sh", "-c", f"while [ -e /dev/shm/{token} ]; do sleep 0.05; done"],
                           timeout=20)
        assert token not in _tokens()
    finally:
        proc.kill()
        proc.wait(30)


def test_the_next_learner_sweeps_the_tokens_of_dead_learners() -> None:
    """Where the tracker died too (its process group killed), the next learner of the
    pid namespace removes the token; a live learner's, and another namespace's, stay."""
    live = shm.ShmToken()
    namespace = live.name.split("-")[2]
    dead = f"ws-token-{namespace}-999999999-1-{'a' * 16}"
    foreign = f"ws-token-1-999999999-1-{'b' * 16}"
    for name in (dead, foreign):
        with open(os.path.join(shm.SHM_DIR, name), "w") as file:
            file.write("x")
    try:
        newer = shm.ShmToken()
        newer.close()
        assert dead not in _tokens()
        assert {live.name, foreign} <= _tokens()
    finally:
        live.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(shm.SHM_DIR, foreign))


_SMALL_SHM = textwrap.dedent("""
    import json, os, sys, threading, torch
    sys.path.insert(0, {tests!r})
    torch.set_num_threads(1)
    from concurrent.futures import ThreadPoolExecutor
    from weight_sync import WeightReceiver, WeightSender
    from weight_sync.errors import SharedMemoryFull
    from weight_sync.wire.shm import create_segment, shm_room
    out = {{}}

    def flat(numel, value):
        return {{"w": torch.full((numel,), float(value))}}

    # a segment larger than the room left: refused at creation, never a SIGBUS later
    try:
        create_segment(shm_room() + (1 << 20))
    except SharedMemoryFull as exc:
        out["too_big"] = type(exc).__name__

    def pair(numel):
        weights, policy = flat(numel, 0), flat(numel, -1)
        tx = WeightSender(weights, 1, timeout=60)
        rx = WeightReceiver(policy, tx.connection_info, 0, timeout=60)
        with ThreadPoolExecutor(1) as pool:
            joined = pool.submit(rx.connect, 60)
            tx.connect(60)
            joined.result(60)
        return tx, rx, weights, policy

    # 100 MB policy, 64 MB /dev/shm: placed on direct sends, every version exact
    tx, rx, weights, policy = pair(25 << 20)
    out["big"] = tx.transports[0]
    exact = []
    for v in range(1, 4):
        weights["w"].fill_(v)
        tx.send_weights_async()
        with ThreadPoolExecutor(1) as pool:
            got = pool.submit(rx.receive_weights, timeout=60)
            tx.wait_ack(60)
            exact.append(got.result(60) == v and bool((policy["w"] == v).all()))
    out["big_exact"] = exact
    rx.close(); tx.close()
    del tx, rx, weights, policy

    # 2 MB policy on shm; /dev/shm then filled by another process mid-run
    tx, rx, weights, policy = pair(1 << 19)
    out["small"] = tx.transports[0]
    for v in range(1, 3):
        weights["w"].fill_(v); tx.send_weights_async()
        rx.receive_weights(timeout=60); tx.wait_ack(60)
    hog = "/dev/shm/hog"
    with open(hog, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, shm_room())
    errors = []
    for v in range(3, 8):  # the collector applies none: the pool must grow
        weights["w"].fill_(v)
        try:
            tx.send_weights_async()
        except SharedMemoryFull:
            errors.append(v)
    out["full_errors"] = errors
    out["version_after_full"] = tx.version
    out["policy_before_apply"] = float(policy["w"][0])
    os.unlink(hog)
    weights["w"].fill_(tx.version + 1)
    v = tx.send_weights_async()
    with ThreadPoolExecutor(1) as pool:
        acked = pool.submit(tx.wait_ack, 60)  # sends v once the pending one is acked
        while (got := rx.receive_weights(timeout=60)) != v:
            assert got is not None
        acked.result(60)
    out["after"] = [v, bool((policy["w"] == v).all())]
    rx.close(); tx.close()

    # the relay's slots (3 per collector, 40 MB each) do not fit: private ones instead,
    # the neighbour takes its head's bytes over the socket
    weights = flat(10 << 20, 0)
    policies = [flat(10 << 20, -1) for _ in range(2)]
    tx = WeightSender(weights, 2, timeout=60, transport="relay")
    rxs = [WeightReceiver(p, tx.connection_info, i, timeout=60) for i, p in enumerate(policies)]
    with ThreadPoolExecutor(2) as pool:
        joined = [pool.submit(rx.connect, 60) for rx in rxs]
        tx.connect(60)
        [j.result(60) for j in joined]
        exact = []
        for v in range(1, 4):
            weights["w"].fill_(v)
            tx.send_weights_async()
            got = [pool.submit(rx.receive_weights, timeout=60) for rx in rxs]
            tx.wait_ack(60)
            exact.append([g.result(60) for g in got] == [v, v]
                         and all(bool((p["w"] == v).all()) for p in policies))
    out["relay_exact"] = exact
    out["relay_private_slots"] = sum(rx._link._end._slots.shared_failed for rx in rxs)
    for rx in rxs:
        rx.close()
    tx.close()

    # /dev/shm full before the learner starts (not even its 32-byte token fits): "auto"
    # leaves shm out and runs; shm named by the user fails at once
    with open(hog, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, shm_room())
    try:
        WeightSender(flat(1 << 10, 0), 1, timeout=60, transport="shm").close()
    except SharedMemoryFull as exc:
        out["named_full"] = type(exc).__name__
    tx, rx, weights, policy = pair(1 << 10)
    out["full_auto"] = tx.transports[0]
    weights["w"].fill_(1); tx.send_weights_async()
    out["full_auto_exact"] = rx.receive_weights(timeout=60) == 1 and bool((policy["w"] == 1).all())
    tx.wait_ack(60)
    rx.close(); tx.close()
    os.unlink(hog)
    print(json.dumps(out), flush=True)
""")


def test_a_small_dev_shm_never_crashes_and_nothing_is_half_applied() -> None:
    """A 64 MB ``/dev/shm`` (Docker's default), in a mount namespace: a segment that
    does not fit is refused at creation (``SharedMemoryFull``); a 100 MB policy runs,
    bit-exact, over direct sends; a 2 MB one runs on shm, and when another process fills
    ``/dev/shm`` mid-run, a send that needs a new buffer raises ``SharedMemoryFull``
    (its version not used, nothing applied), and the run goes on once there is room. The
    relay's slots that do not fit are made in private memory, and its collectors stay
    bit-exact (P3). A ``/dev/shm`` full before the learner starts: ``"auto"`` leaves shm
    out and runs over direct sends; ``transport="shm"`` fails at once."""
    reason = _can_unshare()
    if reason:
        pytest.skip(reason)
    script = _SMALL_SHM.format(tests=str(ROOT / "tests"))
    argv = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
            'mount -t tmpfs -o size=64m tmpfs /dev/shm && exec "$@"', "sh",
            sys.executable, "-c", script]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=170)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["too_big"] == "SharedMemoryFull"
    assert out["big"] == "distributed" and out["big_exact"] == [True] * 3
    assert out["small"] == "shm"
    assert out["full_errors"], out  # typed, not a SIGBUS
    assert out["version_after_full"] == 7 - len(out["full_errors"])  # refused ones unused
    assert out["policy_before_apply"] == 2.0  # nothing applied meanwhile
    assert out["after"] == [out["version_after_full"] + 1, True]
    assert out["relay_exact"] == [True] * 3 and out["relay_private_slots"] > 0
    assert out["named_full"] == "SharedMemoryFull"
    assert out["full_auto"] == "distributed" and out["full_auto_exact"], out


# -- across simulated hosts ----------------------------------------------------------
REASON = testbed.available()
AUTO_NODES = str(ROOT / "tests" / "auto_nodes.py")
RELAY_NODES = str(ROOT / "tests" / "relay_nodes.py")


def _start(host: testbed.Host, argv: list[str]) -> subprocess.Popen[str]:
    with tempfile.NamedTemporaryFile("w+", prefix="auto-", suffix=".err", delete=False) as err:
        proc = host.popen([sys.executable, *argv], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, stderr=err, text=True)
    proc.err_path = err.name  # type: ignore[attr-defined]
    return proc


def _ask(learner: subprocess.Popen[str], command: str) -> Any:
    assert learner.stdin is not None
    learner.stdin.write(command + "\n")
    learner.stdin.flush()
    return line(learner)


@pytest.mark.slow
@pytest.mark.skipif(REASON is not None, reason=f"no test bed here: {REASON}")
def test_a_mixed_run_across_hosts_on_default_settings() -> None:
    """Two collectors on the learner's host and three on two other hosts, default
    settings: shared memory on the learner's host, the relay elsewhere (one head per
    host); every version bit-exact everywhere; one collector killed on each placement
    is reported, the others go on, and each one restarted is placed where it was."""
    placement = {0: 0, 1: 0, 2: 1, 3: 2, 4: 2}
    expected_places = {"0": "shm", "1": "shm", "2": "relay", "3": "relay", "4": "relay"}
    numel = 1 << 20
    with TestBed(hosts=3, rate="1gbit") as bed:
        learner = _start(bed.hosts[0], [AUTO_NODES, json.dumps(
            {"address": bed.hosts[0].address, "n": len(placement), "numel": numel,
             "liveness": 3.0})])
        info = line(learner)["info"]

        def collector(cid: int) -> subprocess.Popen[str]:
            return _start(bed.hosts[placement[cid]], [RELAY_NODES, "collector", json.dumps(
                {"info": info, "cid": cid, "numel": numel})])

        procs = {cid: collector(cid) for cid in placement}
        placed = line(learner)
        assert placed["transports"] == expected_places
        assert placed["local"] == {"0": True, "1": True, "2": False, "3": False, "4": False}
        for version in (1, 2):
            assert _ask(learner, "send") == {"version": version, "failed": [],
                                             "transports": expected_places}
        for victim in (1, 3):  # one per placement (3 heads host 2 in the relay)
            procs[victim].kill()
            procs[victim].wait(WAIT_S)
        got = _ask(learner, "send")
        assert got["version"] == 3 and got["failed"] == [1, 3], got
        restarted = {cid: collector(cid) for cid in (1, 3)}
        assert _ask(learner, "join 1 3")["transports"] == expected_places
        for version in (4, 5):
            assert _ask(learner, "send") == {"version": version, "failed": [],
                                             "transports": expected_places}
        stats = _ask(learner, "close")["stats"]  # then the collectors read the close
        results = {cid: report(p) for cid, p in {**procs, **restarted}.items()
                   if p not in (procs[1], procs[3])}
    for cid in (0, 2, 4):
        assert_exact(results[cid], range(6))
    for cid in (1, 3):
        assert_exact(results[cid], range(3, 6))  # caught up with version 3, then on
    assert results[4]["fetched"].get("learner", 0) <= 1  # at most the version 3's rest
    assert stats["shm"]["collectors"] == 2 and stats["relay"]["collectors"] == 3
