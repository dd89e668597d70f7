"""A learner SIGKILLed and started anew at the same address (real processes).

Collectors with ``reattach_timeout`` keep stepping their environment and their
weights, join the new learner (secret and layout checked anew) and apply its weights
bit-exact, in the same process. A new learner that resumed from an older checkpoint is
refused (default) or accepted as a new epoch (``accept_rewind``); one with another
layout or another secret is refused with a typed error, nothing applied; no learner
coming back ends in ``PeerGone`` naming the address once ``reattach_timeout`` ran out.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

import pytest
import torch
from harness import ChildFailed, ChildTimeout, Cluster
from versioned import MARGIN_S, RX_TIMEOUT_S, expected, fingerprint, make_weights, set_version

from weight_sync import ConnectionInfo, WeightReceiver, WeightSender, WeightSyncError
from weight_sync.collector.reattach import check_first_version
from weight_sync.errors import ProtocolError

pytestmark = pytest.mark.timeout(180)

REATTACH_S = 30.0  # long enough for a new learner process to start on a loaded machine
# The remote collector's wait covers a new group's whole start (spawn, imports, env and
# policy, sender and launcher), which took 12-51 s on a loaded machine.
REMOTE_REATTACH_S = 90.0


# -- children ----------------------------------------------------------------------------
def restarting_learner(out: Connection, go: Connection, port: int, version: int,
                       variant: str = "base", secret: str = "") -> None:
    """A learner on ``port`` (0: any) whose first version is ``version`` (a resumed
    checkpoint); publishes the next version each time it is told, until killed."""
    weights = make_weights(version, variant=variant)
    sender = WeightSender(weights, 1, port=port, timeout=RX_TIMEOUT_S, version=version,
                          secret=secret)
    out.send(("info", sender.connection_info, os.getpid()))
    try:
        sender.connect(timeout=60)
    except WeightSyncError as exc:
        out.send(("learner_error", type(exc).__name__, str(exc), os.getpid()))
        go.poll(600)  # parked: the test kills this process
        return
    out.send(("connected", sender.version, os.getpid()))
    while go.poll(600):
        go.recv()
        set_version(weights, sender.version + 1)
        sender.send_weights_async()
        sender.wait_ack(timeout=RX_TIMEOUT_S)
        out.send(("acked", sender.version, os.getpid()))


def stepping_collector(info: ConnectionInfo, cid: int, out: Connection, cmds: Connection,
                       reattach_timeout: float, accept_rewind: bool = False,
                       secret: str = "", learner_timeout: float = 10.0) -> None:
    """Step an 'environment' with the policy, polling for weights between steps;
    report every apply (with the epoch and the steps so far) and the error that ends
    the stream."""
    weights = make_weights(-7)
    pid = os.getpid()
    rx = WeightReceiver(weights, info, cid, timeout=RX_TIMEOUT_S, secret=secret,
                        reattach_timeout=reattach_timeout, accept_rewind=accept_rewind,
                        learner_timeout=learner_timeout)
    steps = 0
    obs = torch.ones(8)
    try:
        version = rx.connect(timeout=60)
        out.send(("applied", cid, version, fingerprint(weights), pid, rx.epoch, steps))
        while not cmds.poll(0):
            # one env step with the current policy
            obs = torch.tanh(weights["w"] @ obs).reshape(2, 8).mean(0)
            steps += 1
            try:
                version = rx.receive_weights(timeout=0.02)
            except WeightSyncError as exc:
                out.send(("error", cid, type(exc).__name__, str(exc), fingerprint(weights),
                          pid, rx.epoch, steps, rx.version))
                return
            if version is not None:
                out.send(("applied", cid, version, fingerprint(weights), pid, rx.epoch,
                          steps))
    finally:
        rx.close()
        out.send(("exit", cid, None, None, pid))


# -- helpers -----------------------------------------------------------------------------
@pytest.fixture
def cluster() -> Iterator[Cluster]:
    """This module's learner and collector, killed and joined after the test."""
    c = Cluster(collector=stepping_collector, learner=restarting_learner)
    try:
        yield c
    finally:
        c.shutdown()


def _learner(cluster: Cluster, port: int, version: int, **kwargs: object
             ) -> tuple[BaseProcess, Connection, ConnectionInfo]:
    proc, go = cluster.start_learner(port, version, **kwargs)
    info = cluster.take(lambda m: m[0] == "info" and m[2] == proc.pid, 90,
                        "the learner's info")[1]
    return proc, go, info


def _publish(cluster: Cluster, go: Connection, version: int) -> None:
    go.send("publish")
    cluster.take(lambda m: m[0] == "acked" and m[1] == version, 60,
                 f"the learner's version {version} to be acked")


def _first_learner_dies(cluster: Cluster, versions: int, reattach_timeout: float = REATTACH_S,
                        **collector: object) -> tuple[ConnectionInfo, int, float, int]:
    """Learner A syncs a stepping collector up to ``versions`` and is SIGKILLed; the
    collector's pid, when A died, and the collector's env steps at its last apply."""
    learner, go, info = _learner(cluster, 0, 0, secret=collector.get("secret", ""))
    cluster.start(info, 0, extra=(reattach_timeout,
                                                collector.get("accept_rewind", False),
                                                collector.get("secret", "")))
    first = cluster.applied(0, 0, 90)
    assert first[3] == expected(0) and first[5] == 0
    last = first
    for v in range(1, versions + 1):
        _publish(cluster, go, v)
        last = cluster.applied(0, v)
        assert last[3] == expected(v)
    os.kill(learner.pid, signal.SIGKILL)  # type: ignore[arg-type]
    killed = time.monotonic()
    learner.join(10)
    assert not learner.is_alive()
    return info, first[4], killed, last[6]


def _error(cluster: Cluster, timeout: float) -> tuple[object, ...]:
    msg = cluster.take(lambda m: m[0] in ("error", "applied") and m[1] == 0, timeout,
                       "the collector's verdict on the new learner")
    assert msg[0] == "error", f"expected a refusal, the collector applied: {msg}"
    return msg


# -- tests -------------------------------------------------------------------------------
def test_the_version_rule_across_learners() -> None:
    for version, accept_rewind in [(5, False), (6, False), (5, True), (1, True)]:
        check_first_version("collector 0", "h:1", version, 5, accept_rewind)  # accepted
    with pytest.raises(ProtocolError, match=r"h:1 starts at version 1, older than version 5"):
        check_first_version("collector 0", "h:1", 1, 5, False)


@pytest.mark.parametrize("secret", ["", pytest.param("s3cret", marks=pytest.mark.slow,
                                                     id="secret")])
def test_collector_reattaches_to_a_restarted_learner(cluster: Cluster, secret: str) -> None:
    info, pid, _, steps_at_loss = _first_learner_dies(cluster, 2, secret=secret)
    # B resumes from the checkpoint of version 2, on the same port and stream.
    _, go, info_b = _learner(cluster, info.port, 2, secret=secret)
    assert (info_b.host, info_b.port, info_b.name) == (info.host, info.port, info.name)
    resumed = cluster.applied(0, 2, REATTACH_S + MARGIN_S)
    assert resumed[2] == 2 and resumed[3] == expected(2) and resumed[5] == 1, resumed
    assert resumed[4] == pid, "the collector process was restarted"
    _publish(cluster, go, 3)
    after = cluster.applied(0, 3)
    assert after[3] == expected(3), "the new learner's weights are not bit-exact"
    assert after[4] == pid and after[5] == 1
    assert not [m for m in cluster.backlog if m[0] == "error"]
    # It kept stepping its environment while the learner was away (seconds: a new
    # process to start), polling every 0.02 s: a receive_weights that blocked through
    # the reattach would leave a step or two here.
    assert resumed[6] - steps_at_loss >= 10, (steps_at_loss, resumed)
    cluster.stop(0)


@pytest.mark.slow
@pytest.mark.parametrize("accept_rewind", [False, True], ids=["refused", "new-epoch"])
def test_learner_resumed_from_an_older_checkpoint(cluster: Cluster,
                                                  accept_rewind: bool) -> None:
    info, pid, _, _ = _first_learner_dies(cluster, 3, accept_rewind=accept_rewind)
    _, go, _ = _learner(cluster, info.port, 1)  # resumed from version 1's checkpoint
    if not accept_rewind:
        msg = _error(cluster, REATTACH_S + MARGIN_S)
        assert msg[2] == "ProtocolError", msg
        assert "version 1" in str(msg[3]) and "version 3" in str(msg[3]), msg
        assert msg[4] == expected(3), "weights changed although the learner was refused"
        assert msg[5] == pid and msg[6] == 0 and msg[8] == 3
        # The refused learner is told this collector left, within its ack bound.
        told = cluster.take(lambda m: m[0] == "learner_error", RX_TIMEOUT_S + MARGIN_S,
                            "the refused learner to report its collector gone")
        assert told[1] == "CollectorFailed", told
        return
    rewound = cluster.applied(0, 1, REATTACH_S + MARGIN_S)
    assert rewound[2] == 1 and rewound[3] == expected(1) and rewound[5] == 1, rewound
    assert rewound[4] == pid
    _publish(cluster, go, 2)
    nxt = cluster.applied(0, 2)
    assert nxt[3] == expected(2) and nxt[5] == 1
    cluster.stop(0)


@pytest.mark.slow
def test_learner_restarted_with_another_layout(cluster: Cluster) -> None:
    info, pid, _, _ = _first_learner_dies(cluster, 1)
    _learner(cluster, info.port, 1, variant="other_shape")
    msg = _error(cluster, REATTACH_S + MARGIN_S)
    assert msg[2] == "LayoutMismatchError", msg
    assert "w: shape (16, 8) on the collector, (8, 16) on the learner" in str(msg[3]), msg
    assert msg[4] == expected(1) and msg[6] == 0, msg
    assert msg[5] == pid


@pytest.mark.slow
def test_learner_restarted_with_another_secret(cluster: Cluster) -> None:
    info, _, _, _ = _first_learner_dies(cluster, 1, secret="old-secret")
    _learner(cluster, info.port, 1, secret="new-secret")
    msg = _error(cluster, REATTACH_S + MARGIN_S)
    assert msg[2] == "AuthenticationError", msg
    assert msg[4] == expected(1) and msg[6] == 0, msg


def test_no_learner_comes_back(cluster: Cluster) -> None:
    wait_s = 3.0
    info, _, killed, _ = _first_learner_dies(cluster, 1, reattach_timeout=wait_s)
    msg = _error(cluster, wait_s + RX_TIMEOUT_S + MARGIN_S)
    elapsed = time.monotonic() - killed
    assert msg[2] == "PeerGone", msg
    text = str(msg[3])
    assert f"{info.host}:{info.port}" in text and repr(info.name) in text, text
    assert "no learner came back" in text, text
    assert elapsed >= wait_s, f"gave up after {elapsed:.1f}s, before reattach_timeout"
    assert msg[4] == expected(1), "weights changed after the learner died"


@pytest.mark.slow
def test_frozen_learner_with_reattach_still_ends_bounded(cluster: Cluster) -> None:
    """A SIGSTOPped learner still accepts connections (the kernel does) but answers no
    store call: the reattach to it cannot finish, and receive_weights still raises
    within learner_timeout + reattach_timeout + its grace."""
    learner, _, info = _learner(cluster, 0, 0)
    cluster.start(info, 0, extra=(3.0, False, "", 3.0))
    assert cluster.applied(0, 0, 90)[3] == expected(0)
    os.kill(learner.pid, signal.SIGSTOP)  # type: ignore[arg-type]
    stopped = time.monotonic()
    bound = 3.0 + 3.0 + 5.0
    msg = _error(cluster, bound + MARGIN_S)
    assert time.monotonic() - stopped < bound + MARGIN_S
    assert msg[2] == "PeerGone", msg
    assert f"{info.host}:{info.port}" in str(msg[3]) and "reattach_timeout" in str(msg[3]), msg
    assert msg[4] == expected(0), "weights changed while the learner was frozen"
    cluster.take(lambda m: m[0] == "exit" and m[1] == 0, 30, "the collector to exit")


# -- the collectors package: a remote collector taken over by a restarted group ----------
def group_learner(out: Connection, go: Connection, weight_port: int, launcher_port: int,
                  version: int, batches: int, park: bool) -> None:
    """A learner whose CollectorGroup serves one remote collector (NetworkLauncher) on
    the given ports (0: any), starting at ``version``; reports each batch and updates
    the weights after it; after ``batches`` batches it parks (``park``: no more
    updates, until the test kills it) or closes the group."""
    from weight_sync.collectors import CollectorGroup
    from weight_sync.collectors.remote import NetworkLauncher
    from weight_sync.collectors.task import collect, make_env, make_policy
    from weight_sync.collectors.worker import VERSION_KEY

    torch.manual_seed(0)
    policy = make_policy()
    launcher = NetworkLauncher(num_collectors=1, port=launcher_port)
    sender = WeightSender(policy, 1, port=weight_port, timeout=RX_TIMEOUT_S, version=version)
    group = CollectorGroup(policy, make_env, make_policy, collect, num_collectors=1,
                           frames_per_batch=32, launcher=launcher, sender=sender,
                           connect_timeout=90, batch_timeout=60)
    out.send(("ports", sender.connection_info.port, launcher.address[1], os.getpid()))
    with group:
        for n, batch in enumerate(group):
            tags = batch[VERSION_KEY]
            out.send(("batch", group.pids[0], int(tags.min()), int(tags.max()), group.version,
                      os.getpid()))
            if n + 1 >= batches:
                if park:
                    go.poll(600)
                break
            group.update_weights(timeout=30)
    out.send(("closed", os.getpid()))


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_remote_collector_taken_over_by_a_restarted_group() -> None:
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    cluster = Cluster(learner=group_learner)
    proc: subprocess.Popen[str] | None = None
    err_file = tempfile.TemporaryFile("w+")  # noqa: SIM115 (closed in the finally below)
    try:
        first, _ = cluster.start_learner(0, 0, 0, 2, True)
        _, weight_port, launcher_port, _ = cluster.take(lambda m: m[0] == "ports", 90,
                                                        "the first group's ports")
        env = {**os.environ, "WEIGHT_SYNC_COLLECTORS": f"127.0.0.1:{launcher_port}",
               "RANK": "0"}
        # A file, not a pipe: c10d's stack traces as the first learner dies could fill
        # a pipe nobody reads until the end, and block the collector.
        proc = subprocess.Popen([sys.executable, "-m", "weight_sync.collectors.remote",
                                 "--reattach-timeout", str(REMOTE_REATTACH_S)], cwd=root,
                                env=env, stdout=subprocess.DEVNULL, stderr=err_file,
                                text=True)
        for _ in range(2):
            got = cluster.take(lambda m: m[0] == "batch" and m[5] == first.pid, 120,
                               "a batch for the first group")
        assert got[1] == proc.pid and got[4] == 1  # parked: no update after this batch
        os.kill(first.pid, signal.SIGKILL)  # type: ignore[arg-type]
        first.join(10)
        resume = int(got[4])  # the first group's last version: its "checkpoint"
        second, _ = cluster.start_learner(weight_port, launcher_port, resume, 4, False)
        try:
            batches = [cluster.take(lambda m: m[0] == "batch" and m[5] == second.pid,
                                    REMOTE_REATTACH_S + MARGIN_S,
                                    "a batch for the restarted group")
                       for _ in range(4)]
        except (ChildTimeout, ChildFailed) as exc:  # say what the collector itself said
            raise AssertionError(f"{exc}\ncollector's stderr:\n{_tail(err_file)}") from exc
        assert proc.poll() is None, "the collector process ended"
        assert {b[1] for b in batches} == {proc.pid}, "not the same collector process"
        # The new group's updates reach it: its last batch acts with the new learner's
        # weights (versions go on from the checkpoint).
        assert batches[-1][2] > resume, batches
        assert all(b[2] >= resume for b in batches[1:]), batches
        cluster.take(lambda m: m[0] == "closed", 60, "the second group to close")
        assert proc.wait(60) == 0, _tail(err_file)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(30)
        cluster.shutdown()
        err_file.close()


def _tail(file: Any) -> str:
    file.flush()
    file.seek(0)
    lines = [ln for ln in file.read().splitlines()
             if not ln.startswith(("frame #", "Exception raised", "[W"))]
    return "\n".join(lines[-30:])
