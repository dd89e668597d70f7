"""The transport registry, and the learner's choice of transport per collector: shared
memory only for a collector that really shares this host's ``/dev/shm``, which it
unmaps when it closes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import harness
import pytest
import torch
from harness import Cluster
from test_transport_contract import group
from versioned import (
    RX_TIMEOUT_S,
    connect_all,
    expected,
    fingerprint,
    make_weights,
    publish,
)

from weight_sync import CollectorFailed, ConnectionInfo, SenderConfig, WeightReceiver, WeightSender
from weight_sync.errors import ConfigError
from weight_sync.transports import (
    ReceiverTransport,
    SenderTransport,
    TransportSpec,
    get_transport,
    register_transport,
    transport_names,
)
from weight_sync.transports.base import LearnerSide, LinkSpec
from weight_sync.wire.layout import BufferLayout

#: The user-written transport of the example package docs/examples/socket-transport,
#: found through its entry point (installed by the README's test command).
SOCKET = "socket"

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[1]


def test_registry_lists_builtins_and_refuses_bad_specs() -> None:
    assert {"distributed", "shm", SOCKET} <= set(transport_names())
    assert get_transport("shm").fallback == "distributed"
    with pytest.raises(ConfigError, match=r"unknown transport 'nope'; registered: \[.*'shm'"):
        get_transport("nope")
    spec = get_transport(SOCKET)
    with pytest.raises(ConfigError, match="already registered"):
        register_transport(spec)
    register_transport(spec, replace=True)
    with pytest.raises(ConfigError, match="falls back to 'ghost'"):
        register_transport(TransportSpec("x", sender=spec.sender, receiver=spec.receiver,
                                         fallback="ghost"))
    with pytest.raises(ConfigError, match="both offer and probe"):
        TransportSpec("y", sender=spec.sender, receiver=spec.receiver, probe=dict)
    with pytest.raises(ConfigError, match="got 'a b'"):
        TransportSpec("a b", sender=spec.sender, receiver=spec.receiver)


_FRESH = textwrap.dedent("""
    import json, sys
    import weight_sync
    def loaded():
        return sorted(m for m in sys.modules
                      if m.startswith(("ws_socket_transport", "weight_sync.transports.")))
    before = loaded()
    from weight_sync.transports import get_transport, transport_names
    names = transport_names()
    spec = get_transport(sys.argv[1])
    print(json.dumps({"before": before, "names": names, "spec": spec.name,
                      "after": loaded()}))
""")


def test_an_installed_transport_is_found_by_its_entry_point_in_a_fresh_process() -> None:
    """A process that never imported the plug-in package finds its transport by name,
    and ``import weight_sync`` loads no transport implementation until one is used."""
    out = subprocess.run([sys.executable, "-c", _FRESH, SOCKET], capture_output=True,
                         text=True, timeout=60, cwd="/")
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout)
    assert not [m for m in seen["before"] if m.endswith(("_sender", "_receiver"))
                or m.startswith("ws_socket_transport")], seen["before"]
    assert SOCKET in seen["names"] and seen["spec"] == SOCKET
    assert "ws_socket_transport" in seen["after"]


@pytest.mark.parametrize("name", sorted(set(transport_names()) | {SOCKET}))
def test_each_end_satisfies_its_protocol(name: str) -> None:
    spec = get_transport(name)
    link = LinkSpec(0, 1, BufferLayout.from_weights(make_weights(0)))
    side = None if spec.learner is None else spec.learner(SenderConfig())
    if side is not None:  # its ends are built by the learner-wide side
        assert isinstance(side, LearnerSide)
        sender_end = side.end(link)
    else:
        assert spec.sender is not None
        sender_end = spec.sender(link)
    receiver_end = spec.receiver(link)
    assert isinstance(sender_end, SenderTransport)
    assert isinstance(receiver_end, ReceiverTransport)
    sender_end.close()
    receiver_end.close()
    if side is not None:
        side.close()


# -- shared memory only where /dev/shm is really shared ------------------------------
_COLLECTOR = textwrap.dedent("""
    import json, sys
    sys.path[:0] = [{tests!r}, {root!r}]
    from versioned import make_weights, fingerprint
    from weight_sync import ConnectionInfo, WeightReceiver
    info = ConnectionInfo.from_json(sys.argv[1])
    weights = make_weights(-7)
    rx = WeightReceiver(weights, info, int(sys.argv[2]), timeout=30)
    rx.connect(60)
    version = rx.receive_weights(timeout=60)
    print(json.dumps([rx.transport, version, fingerprint(weights)]), flush=True)
    rx.close()
""")


def _namespaced(cmd: list[str]) -> list[str]:
    """``cmd`` in a new mount namespace with its own /dev/shm: same hostname, same
    pid namespace, same network, but not the learner's shared memory."""
    script = 'mount -t tmpfs tmpfs /dev/shm && exec "$@"'
    return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script,
            "sh", *cmd]


def _can_unshare() -> str | None:
    if os.geteuid() != 0:
        return "needs root (a mount namespace with its own /dev/shm)"
    if shutil.which("unshare") is None:
        return "needs util-linux's unshare"
    probe = subprocess.run(_namespaced(["true"]), capture_output=True, timeout=30)
    return None if probe.returncode == 0 else f"unshare failed: {probe.stderr!r}"


def test_shm_is_chosen_only_for_a_collector_that_shares_dev_shm(tmp_path: Path) -> None:
    reason = _can_unshare()
    if reason:
        pytest.skip(reason)
    weights = make_weights(0)
    script = tmp_path / "collector.py"
    script.write_text(_COLLECTOR.format(tests=str(ROOT / "tests"), root=str(ROOT)))
    with WeightSender(weights, 2, timeout=RX_TIMEOUT_S, transport="shm") as sender:
        info = sender.connection_info.to_json()
        base = [sys.executable, str(script), info]
        children = [subprocess.Popen([*base, "0"], stdout=subprocess.PIPE, text=True),
                    subprocess.Popen(_namespaced([*base, "1"]), stdout=subprocess.PIPE,
                                     text=True)]
        try:
            sender.connect(timeout=90)
            # same hostname for both; only collector 0 can read the learner's token
            assert sender.transports == {0: "shm", 1: "distributed"}
            v = publish(sender, weights)
            assert sender.wait_ack(timeout=30).acked == (0, 1)
            outs = [json.loads(c.communicate(timeout=60)[0].strip().splitlines()[-1])
                    for c in children]
        finally:
            for child in children:
                child.kill()
                child.wait(10)
    assert outs == [["shm", v, expected(v)], ["distributed", v, expected(v)]]


def _mapped_segments() -> int:
    """Message segments mapped here (weight-sync names them ``ws-seg-*``; the
    semaphores of multiprocessing live in ``/dev/shm/sem.*``)."""
    with open("/proc/self/maps") as maps:
        return sum("/dev/shm/ws-seg-" in line for line in maps)


def shm_collector(info: ConnectionInfo) -> tuple[str, int, int, int, str]:
    weights = make_weights(-7)
    rx = WeightReceiver(weights, info, 0, timeout=RX_TIMEOUT_S)
    rx.connect(60)
    version = rx.receive_weights(timeout=60)
    assert version is not None
    mapped = _mapped_segments()
    rx.close()
    return rx.transport, version, mapped, _mapped_segments(), fingerprint(weights)


def test_shm_collector_unmaps_every_segment_on_close() -> None:
    weights = make_weights(0)
    with WeightSender(weights, 1, timeout=RX_TIMEOUT_S, transport="shm") as sender, \
            harness.spawn_collectors([(shm_collector, (sender.connection_info,))],
                                     timeout=60) as children:
        sender.connect(timeout=60)
        v = publish(sender, weights)
        sender.wait_ack(timeout=30)
    (transport, version, before, after, got), = children.results
    assert (transport, version, got) == ("shm", v, expected(v))
    assert before >= 1, "the collector never mapped a segment"
    assert after == 0, f"{after} segment(s) still mapped after close()"


def test_shm_token_is_removed_with_the_sender() -> None:
    before = set(os.listdir("/dev/shm"))
    sender = WeightSender({"w": torch.zeros(3)}, 1, transport="shm")
    tokens = {n for n in set(os.listdir("/dev/shm")) - before if n.startswith("ws-token-")}
    assert len(tokens) == 1
    sender.close()
    assert not tokens & set(os.listdir("/dev/shm"))


# -- zero-copy collectors ("shm" lends the learner's snapshot) ------------------------
def test_zero_copy_collector_holding_a_snapshot_sees_it_unchanged() -> None:
    """A collector that stops applying keeps using the learner's snapshot of the
    version it holds while the learner publishes many newer ones (the others keep up):
    it is never rewritten under it. When it resumes: the in-flight version, then the
    newest, bit-exact; the learner's buffers stay bounded throughout."""
    with group("shm", 2) as (sender, (slow, fast), (slow_policy, fast_policy), weights):
        v = publish(sender, weights)
        for rx in (slow, fast):
            assert rx.receive_weights(timeout=30) == v
        sender.wait_ack(timeout=30)
        held = v
        in_flight = None
        for _ in range(30):
            v = publish(sender, weights)
            in_flight = in_flight or v
            assert fast.receive_weights(timeout=30) == v
            assert fingerprint(fast_policy) == expected(v)
            assert fingerprint(slow_policy) == expected(held), "a lent snapshot changed"
            assert sender.buffers_in_use <= 2 * 2 + 2
        assert slow.receive_weights(timeout=30) == in_flight
        assert fingerprint(slow_policy) == expected(in_flight)
        done = threading.Thread(target=lambda: slow.receive_weights(timeout=30))
        done.start()
        assert sender.wait_ack(timeout=30).complete
        done.join(30)
        assert slow.version == v and fingerprint(slow_policy) == expected(v)


def test_zero_copy_memory_bounded_over_a_thousand_versions() -> None:
    with group("shm", 2) as (sender, receivers, policies, weights):
        for _ in range(1000):
            v = publish(sender, weights)
            for rx in receivers:
                assert rx.receive_weights(timeout=30) == v
            sender.wait_ack(timeout=30)
        assert all(fingerprint(p) == expected(v) for p in policies)
        assert sender.buffers_allocated <= 2 * 2 + 2, sender.buffers_allocated
        assert sender.buffers_in_use <= 3  # each collector's one (shared) + the newest


def test_zero_copy_policy_writing_its_weights_changes_only_its_own_pages() -> None:
    with group("shm", 2) as (sender, (writer, reader), (written, read), weights):
        v = publish(sender, weights)
        for rx in (writer, reader):
            assert rx.receive_weights(timeout=30) == v
        sender.wait_ack(timeout=30)
        with torch.no_grad():
            written["w"].add_(1.0)  # e.g. a policy updating running statistics in place
        assert fingerprint(read) == expected(v)  # the other collector: untouched
        v = publish(sender, weights)
        for rx in (writer, reader):
            assert rx.receive_weights(timeout=30) == v
        assert fingerprint(written) == expected(v) == fingerprint(read)
        sender.wait_ack(timeout=30)


def test_zero_copy_collector_killed_while_holding_a_snapshot_frees_it(
        cluster: Cluster) -> None:
    weights = make_weights(0)
    with WeightSender(weights, 2, timeout=RX_TIMEOUT_S, transport="shm") as sender:
        connect_all(sender, cluster, [0, 1])
        v = publish(sender, weights)
        sender.wait_ack(timeout=30)
        for cid in (0, 1):
            assert cluster.applied(cid, v)[3] == expected(v)
        cluster.kill(0)  # it held version v's snapshot
        publish(sender, weights)
        with pytest.raises(CollectorFailed):
            sender.wait_ack(timeout=30)
        v = publish(sender, weights)
        assert sender.wait_ack(timeout=30).acked == (1,)
        assert cluster.applied(1, v)[3] == expected(v)
        assert sender.buffers_in_use <= 2  # collector 1's version (the newest) only
        cluster.stop(1)
