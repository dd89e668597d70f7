"""The test bed's dealings with the system: ``ip``/``tc`` commands (each bounded),
namespace names and their owners, the processes inside a namespace, and the removal of
what a dead bed left behind.

Every namespace a bed makes is named ``wsbed-<pid>.<start>-<seq>-<role>``: the creating
process's pid and start time (clock ticks since boot, from ``/proc/<pid>/stat``), so a
leftover is recognised as orphaned only when its creator is really gone (a recycled pid
has another start time), and two beds never collide (another process has another pid;
one process numbers its beds).
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterable, Sequence

__all__ = [
    "PREFIX", "CMD_TIMEOUT_S", "TestBedError", "cmd", "owner_tag", "list_namespaces",
    "namespace_pids", "kill_and_wait", "delete_namespace", "remove_leftovers",
]

#: The first part of every name the bed gives a namespace or a temporary folder.
PREFIX = "wsbed"
#: Bound on one ``ip``/``tc``/``unshare`` command.
CMD_TIMEOUT_S = 10.0

_NAME_RE = re.compile(rf"^{PREFIX}-(\d+)\.(\d+)-")


class TestBedError(RuntimeError):
    """The test bed could not be built, driven or torn down (the message says what)."""

    __test__ = False  # not a pytest test class


def cmd(argv: Sequence[str], timeout: float = CMD_TIMEOUT_S, *,
        check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a system command to completion within ``timeout`` seconds.

    Raises:
        TestBedError: it failed (``check``) or ran past ``timeout``; stderr quoted.
    """
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        raise TestBedError(f"`{' '.join(argv)}` ran past {timeout:.0f}s") from exc
    except OSError as exc:
        raise TestBedError(f"`{' '.join(argv)}` cannot run: {exc}") from exc
    if check and done.returncode != 0:
        raise TestBedError(f"`{' '.join(argv)}` failed (exit {done.returncode}): "
                           f"{done.stderr.strip() or done.stdout.strip()}")
    return done


def owner_tag(pid: int | None = None) -> str | None:
    """``<pid>.<start time>`` of a live process (default: this one), else ``None``."""
    pid = os.getpid() if pid is None else pid
    try:
        with open(f"/proc/{pid}/stat") as file:
            stat = file.read()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] in ("Z", "X"):  # exited, not reaped yet: gone all the same
        return None
    return f"{pid}.{fields[19]}"  # field 22 of stat(5): start time


def _owner_alive(name: str) -> bool:
    match = _NAME_RE.match(name)
    if match is None:
        return True  # not one of ours: never touched
    pid, start = match.groups()
    return owner_tag(int(pid)) == f"{pid}.{start}"


def list_namespaces(prefix: str = PREFIX + "-") -> list[str]:
    """The named network namespaces (``ip netns list``) starting with ``prefix``."""
    out = cmd(["ip", "netns", "list"]).stdout
    names = (line.split()[0] for line in out.splitlines() if line.strip())
    return [n for n in names if n.startswith(prefix)]


def namespace_pids(name: str) -> list[int]:
    """The processes in network namespace ``name`` (none if it does not exist)."""
    done = cmd(["ip", "netns", "pids", name], check=False)
    return [int(tok) for tok in done.stdout.split() if tok.isdigit()]


def kill_and_wait(pids: Iterable[int], timeout: float) -> list[int]:
    """SIGKILL ``pids`` and wait (on pidfds: no polling) until they are gone or
    ``timeout`` passes; returns those still alive then. The caller reaps its own
    children; the others are reaped by their parents (or init)."""
    fds: dict[int, int] = {}
    for pid in set(pids):
        try:
            fds[os.pidfd_open(pid)] = pid
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue
    deadline = time.monotonic() + timeout
    try:
        while fds:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            ready, _, _ = select.select(list(fds), [], [], left)
            for fd in ready:
                os.close(fd)
                del fds[fd]
        return sorted(fds.values())
    finally:
        for fd in fds:
            os.close(fd)


def delete_namespace(name: str, timeout: float = 5.0) -> list[str]:
    """Kill every process in namespace ``name``, then delete it (its veth ends and
    bridge go with it); returns problems (empty if it is gone)."""
    problems = []
    alive = kill_and_wait(namespace_pids(name), timeout)
    if alive:
        problems.append(f"{name}: processes {alive} still alive after SIGKILL")
    done = cmd(["ip", "netns", "delete", name], check=False)
    if done.returncode != 0 and "No such file" not in done.stderr:
        problems.append(f"{name}: `ip netns delete` failed: {done.stderr.strip()}")
    return problems


def remove_leftovers() -> list[str]:
    """Delete the namespaces and temporary folders of beds whose creator is dead (and
    kill what still runs in them); returns the namespaces removed. Live beds, of this
    process or another, are left alone."""
    removed = []
    for name in list_namespaces():
        if not _owner_alive(name):
            delete_namespace(name)
            removed.append(name)
    tmp = tempfile.gettempdir()
    for entry in os.listdir(tmp):
        if entry.startswith(PREFIX + "-") and not _owner_alive(entry):
            with contextlib.suppress(OSError):
                shutil.rmtree(os.path.join(tmp, entry))
    return removed
