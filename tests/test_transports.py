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
from pathlib import Path

import harness
import pytest
import socket_transport
import torch
from versioned import RX_TIMEOUT_S, expected, fingerprint, make_weights, publish

from weight_sync import ConfigError, ConnectionInfo, WeightReceiver, WeightSender
from weight_sync.layout import BufferLayout
from weight_sync.transports import (
    ReceiverTransport,
    SenderTransport,
    TransportSpec,
    get_transport,
    register_transport,
    transport_names,
)
from weight_sync.transports.base import LinkSpec

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[1]


def test_registry_lists_builtins_and_refuses_bad_specs() -> None:
    assert {"distributed", "shm", socket_transport.NAME} <= set(transport_names())
    assert get_transport("shm").fallback == "distributed"
    with pytest.raises(ConfigError, match=r"unknown transport 'nope'; registered: \[.*'shm'"):
        get_transport("nope")
    spec = get_transport(socket_transport.NAME)
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


@pytest.mark.parametrize("name", sorted(set(transport_names()) | {socket_transport.NAME}))
def test_each_end_satisfies_its_protocol(name: str) -> None:
    spec = get_transport(name)
    link = LinkSpec(0, 1, BufferLayout.from_weights(make_weights(0)))
    sender_end, receiver_end = spec.sender(link), spec.receiver(link)
    assert isinstance(sender_end, SenderTransport)
    assert isinstance(receiver_end, ReceiverTransport)
    sender_end.close()
    receiver_end.close()


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
    """Message segments mapped here (``SharedMemory`` names them ``psm_*``; the
    semaphores of multiprocessing live in ``/dev/shm/sem.*``)."""
    with open("/proc/self/maps") as maps:
        return sum("/dev/shm/psm_" in line for line in maps)


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
