"""The demo's collectors over the network (``weight-sync demo --launcher network``).

The learner listens with a :class:`~weight_sync.collectors.remote.NetworkLauncher` at ``--listen``
(``HOST:PORT``; port 0: a free one) and waits ``--connect-timeout`` s for
``--collectors`` processes to connect, each started as::

    WEIGHT_SYNC_COLLECTORS=<listen address> RANK=<id> python -m weight_sync.collectors.remote

on any host that reaches the learner (the weight stream then needs ``--learner-host``,
an address of the learner's host that the collectors reach). With
``--start-collectors`` the demo starts those processes itself, on this host, and reaps
them at the end: batches then cross loopback sockets instead of pipes.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import secrets
import subprocess
import sys
import time
from typing import Any

from weight_sync.collectors.remote import ADDRESS_ENV, KEY_ENV, NetworkLauncher

__all__ = ["NetworkCollectors", "parse_listen"]

log = logging.getLogger(__name__)

_REAP_S = 10.0  # after the group closed, each started collector has stopped or is killed


def parse_listen(value: str) -> tuple[str, int]:
    """``"HOST:PORT"`` -> ``(host, port)``; raises ``ValueError`` quoting ``value``."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"--listen must be HOST:PORT with a port in [0, 65535], "
                         f"got {value!r}")
    return host, int(port)


class NetworkCollectors:
    """The demo's :class:`NetworkLauncher`, and the collector processes it started (with
    ``args.start_collectors``); a context manager that reaps them on exit.

    Args:
        args: the demo's arguments (``collectors``, ``listen``, ``start_collectors``).
        say: where to tell the user how to start the collectors (a console's ``print``).
    """

    def __init__(self, args: argparse.Namespace, say: Any) -> None:
        host, port = parse_listen(args.listen)
        # Collectors the demo starts itself share a fresh key with it; others prove
        # WEIGHT_SYNC_COLLECTOR_KEY (or the public default, which only loopback excuses).
        key = None
        if args.start_collectors and not os.environ.get(KEY_ENV):
            key = secrets.token_hex(16)
        elif not os.environ.get(KEY_ENV) and host not in ("127.0.0.1", "localhost"):
            log.warning("%s is not set: whoever reaches %s can join as a collector",
                        KEY_ENV, args.listen)
        self.launcher = NetworkLauncher(args.collectors, host, port,
                                        authkey=key.encode() if key else None)
        self.processes: list[subprocess.Popen[bytes]] = []
        address = "{}:{}".format(*self.launcher.address)
        if not args.start_collectors:
            say(f"waiting for {args.collectors} collector(s) at {address}: on each host "
                f"run {ADDRESS_ENV}={address} RANK=<0..{args.collectors - 1}> "
                f"python -m weight_sync.collectors.remote")
            return
        env = {**os.environ, ADDRESS_ENV: address, **({KEY_ENV: key} if key else {})}
        try:
            for cid in range(args.collectors):
                self.processes.append(subprocess.Popen(
                    [sys.executable, "-m", "weight_sync.collectors.remote", "--id", str(cid),
                     "--timeout", str(args.connect_timeout)],
                    env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL))
        except BaseException:
            self.close()
            raise

    @property
    def hosts(self) -> dict[int, str]:
        """Collector id -> the hostname it connected from (connected ones)."""
        return self.launcher.hosts

    def exit_codes(self) -> list[int | None]:
        """Exit codes of the processes the demo started (``None``: still running)."""
        return [p.poll() for p in self.processes]

    def close(self) -> None:
        """Reap the started collectors (killing any still running after a bound) and
        stop listening; idempotent."""
        deadline = time.monotonic() + _REAP_S
        for proc in self.processes:
            try:
                proc.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                log.warning("collector pid %d did not stop within %.0fs; killing it",
                            proc.pid, _REAP_S)
                proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(_REAP_S)
        self.launcher.shutdown(_REAP_S)

    def __enter__(self) -> NetworkCollectors:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
