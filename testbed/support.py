"""Whether a test bed can be built here: :func:`available` (``None`` or the reason why
not), checked once per process by building a throwaway namespace."""

from __future__ import annotations

import functools
import os
import shutil
import sys

from testbed._system import PREFIX, TestBedError, cmd, delete_namespace, owner_tag

__all__ = ["available", "has_netem"]

#: The commands the bed runs, and where they come from.
_TOOLS = {"ip": "iproute2", "tc": "iproute2", "unshare": "util-linux",
          "nsenter": "util-linux"}


def available(*, delay: bool = False) -> str | None:
    """``None`` if a :class:`~testbed.TestBed` can be built here, else why not.

    Args:
        delay: also require what a bed with ``delay_ms > 0`` needs (tc's netem qdisc).
    """
    if not sys.platform.startswith("linux"):
        return f"the test bed needs Linux network namespaces (this is {sys.platform})"
    if os.geteuid() != 0:
        return f"the test bed needs root (network namespaces, tc); running as uid {os.geteuid()}"
    for tool, package in _TOOLS.items():
        if shutil.which(tool) is None:
            return f"the test bed needs `{tool}` (install {package})"
    reason, netem = _probe()
    if reason is None and delay and not netem:
        return ("the test bed's delay needs tc's netem qdisc, which this kernel lacks "
                "(CONFIG_NET_SCH_NETEM)")
    return reason


def has_netem() -> bool:
    """Whether tc's netem qdisc (``delay_ms``) works here (``False`` if no bed does)."""
    return available() is None and _probe()[1]


@functools.cache
def _probe() -> tuple[str | None, bool]:
    """(why no bed can be built, or None; whether netem works), from a throwaway
    namespace with a veth pair, a tbf qdisc and a private hostname and ``/dev/shm``."""
    name = f"{PREFIX}-{owner_tag()}-probe-ns"
    try:
        cmd(["ip", "netns", "add", name])
    except TestBedError as exc:
        return f"`ip netns` does not work here: {exc}", False
    try:
        steps = [
            ("a veth pair", ["ip", "-n", name, "link", "add", "name", "va", "type", "veth",
                             "peer", "name", "vb"]),
            ("tc's tbf qdisc", ["tc", "-n", name, "qdisc", "add", "dev", "va", "root", "tbf",
                                "rate", "1gbit", "burst", "512kb", "latency", "100ms"]),
            ("a private hostname and /dev/shm",
             ["ip", "netns", "exec", name, "unshare", "--uts", "--ipc", "--mount",
              "--propagation", "private", "--", "sh", "-c",
              "hostname wsbed-probe && mount -t tmpfs tmpfs /dev/shm"]),
        ]
        for what, argv in steps:
            try:
                cmd(argv)
            except TestBedError as exc:
                return f"the test bed needs {what}, which fails here: {exc}", False
        netem = cmd(["tc", "-n", name, "qdisc", "add", "dev", "vb", "root", "netem", "delay",
                     "1ms"], check=False).returncode == 0
        return None, netem
    finally:
        delete_namespace(name)
