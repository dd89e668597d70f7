"""Simulated hosts: :class:`TestBed` builds them, :class:`Host` runs processes on one.

Layout of a bed named ``P`` (``wsbed-<pid>.<start>-<seq>``, see :mod:`testbed._system`)::

    netns P-sw:  bridge br0 ── ports h0, h1, ...          (the switch)
    netns P-h<i>: eth0 (10.213.0.<i+1>/24, peer of h<i>), lo  (host i)

Nothing is created in the root namespace: each veth pair is made inside the switch
namespace with its host end moved straight into the host's namespace. The hosts have
no default route, so their addresses reach only each other. Each link is shaped on
both ends (egress of ``eth0`` = the host's uplink, egress of ``h<i>`` = its downlink).

Each host has one *holder* process (``ip netns exec`` + ``unshare --uts --ipc
--mount``) that sets the hostname, mounts a private tmpfs on ``/dev/shm`` and an
``/etc/hosts`` naming every host of the bed, then waits on a pipe from the bed (so it
also ends if the bed's process dies). :meth:`Host.popen` enters the holder's
namespaces with ``nsenter``, so all processes of one host share its hostname,
``/dev/shm`` and network, and processes of different hosts share none of them.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import json
import logging
import os
import select
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any

from testbed._system import (
    PREFIX,
    TestBedError,
    cmd,
    delete_namespace,
    list_namespaces,
    owner_tag,
    remove_leftovers,
)
from testbed.support import available

__all__ = ["TestBed", "Host"]

log = logging.getLogger(__name__)

_SEQ = itertools.count()
#: How long teardown waits for a killed process, and for a link to come up.
_KILL_WAIT_S = 5.0
_LINK_WAIT_S = 5.0

# The holder: hostname, private /dev/shm, the bed's /etc/hosts, then wait on stdin.
_HOLDER = ('hostname "$1" && mount -t tmpfs -o mode=1777 tmpfs /dev/shm && '
           'mount --bind "$2" /etc/hosts && echo ready && exec cat')


class Host:
    """One simulated host of a :class:`TestBed` (made by the bed, not by you)."""

    def __init__(self, bed: TestBed, index: int, name: str, address: str) -> None:
        self.bed = bed
        self.index = index
        self.name = name
        """Its hostname (what ``socket.gethostname()`` says on it)."""
        self.address = address
        """Its IPv4 address on the bed's network (reachable from the other hosts only)."""
        self.netns = f"{bed.prefix}-h{index}"
        """Its network namespace (``ip -n <netns> ...``)."""
        self.switch_port = f"h{index}"
        """Its link's end on the switch (in namespace ``bed.switch``)."""
        self._holder: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        return f"Host({self.name!r}, {self.address}, netns={self.netns!r})"

    def command(self, argv: Sequence[str], cwd: str | None = None) -> list[str]:
        """The command line that runs ``argv`` on this host, in ``cwd`` (default: the
        current directory)."""
        if self._holder is None or self._holder.poll() is not None:
            raise TestBedError(f"{self.name} is not running (bed {self.bed.prefix} "
                               f"not started, or closed)")
        return ["nsenter", f"--target={self._holder.pid}", "--net", "--uts", "--ipc",
                "--mount", f"--wd={os.path.abspath(cwd or os.getcwd())}", "--", *argv]

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` on this host; ``kwargs`` go to :class:`subprocess.Popen`.

        The process gets its own session (``start_new_session=True`` unless given), and
        the bed kills it (and whatever it started on this host) when it closes.
        """
        kwargs.setdefault("start_new_session", True)
        return self.bed._spawn(self.command(argv, kwargs.pop("cwd", None)), kwargs)

    def run(self, argv: Sequence[str], timeout: float = 30.0, *, input: Any = None,
            check: bool = False, text: bool = True,
            **kwargs: Any) -> subprocess.CompletedProcess[Any]:
        """Run ``argv`` on this host to completion, its output captured.

        Raises:
            subprocess.TimeoutExpired: it ran past ``timeout`` (it is killed first).
            subprocess.CalledProcessError: it failed and ``check`` is set.
        """
        kwargs.setdefault("stdout", subprocess.PIPE)
        kwargs.setdefault("stderr", subprocess.PIPE)
        stdin = subprocess.DEVNULL if input is None else subprocess.PIPE
        proc = self.popen(argv, stdin=stdin, text=text, **kwargs)
        try:
            out, err = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill(proc)
            out, err = _drain(proc)
            raise subprocess.TimeoutExpired(list(argv), timeout, out, err) from None
        except BaseException:
            _kill(proc)
            _drain(proc)
            raise
        done = subprocess.CompletedProcess(list(argv), proc.returncode, out, err)
        if check:
            done.check_returncode()
        return done

    def _start_holder(self, hosts_file: str, deadline: float) -> None:
        argv = ["ip", "netns", "exec", self.netns, "unshare", "--uts", "--ipc", "--mount",
                "--propagation", "private", "--", "sh", "-c", _HOLDER, "sh", self.name,
                hosts_file]
        self._holder = proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True)
        assert proc.stdout is not None
        said = _read_line(proc.stdout.fileno(), deadline)
        if said != b"ready\n":
            _kill(proc)
            rest = _drain(proc)[0] or b""
            raise TestBedError(f"{self.name}: its namespaces could not be set up: "
                               f"{(said + rest).decode(errors='replace').strip()!r}")

    def _stop_holder(self) -> subprocess.Popen[bytes] | None:
        proc, self._holder = self._holder, None
        if proc is not None:
            _kill(proc)
        return proc


class TestBed:
    """N simulated hosts on one switch, each link shaped; torn down on exit.

    Example::

        with TestBed(hosts=3, rate="1gbit") as bed:
            server = bed.hosts[1].popen([sys.executable, "server.py", bed.hosts[1].address])
            bed.hosts[0].run([sys.executable, "client.py", bed.hosts[1].address], timeout=30)
            bed.cut(1)        # host 1's link goes down ...
            bed.restore(1)    # ... and up again

    Args:
        hosts: how many hosts (1..250): ``host0``, ``host1``... at ``<subnet>.1``...
        rate: each link's rate in each direction, in tc's units (``"1gbit"``,
            ``"100mbit"``); ``None`` leaves the links unshaped.
        delay_ms: one-way delay added on each link in each direction (a packet from one
            host to another crosses two links: ``2 * delay_ms`` one way); needs tc's
            netem qdisc.
        burst, latency: tc tbf's bucket size and queueing bound for the rate.
        subnet: the first three octets of the bed's /24 (private to the bed's namespaces).
        timeout: bound on building the bed.

    Raises (from :meth:`start` / ``with``):
        TestBedError: it cannot be built here (:func:`testbed.available` says why) or a
            step failed; whatever was made by then is removed.
    """

    __test__ = False  # not a pytest test class

    def __init__(self, hosts: int = 2, *, rate: str | None = "1gbit", delay_ms: float = 0.0,
                 burst: str = "512kb", latency: str = "100ms", subnet: str = "10.213.0",
                 timeout: float = 30.0) -> None:
        if not isinstance(hosts, int) or not 1 <= hosts <= 250:
            raise ValueError(f"hosts must be an int in [1, 250], got {hosts!r}")
        if not delay_ms >= 0:
            raise ValueError(f"delay_ms must be >= 0, got {delay_ms!r}")
        if len(subnet.split(".")) != 3:
            raise ValueError(f"subnet must be three octets like '10.213.0', got {subnet!r}")
        self.rate = rate
        self.delay_ms = delay_ms
        self.burst = burst
        self.latency = latency
        self.timeout = timeout
        self.prefix = f"{PREFIX}-{owner_tag()}-{next(_SEQ)}"
        """The start of every namespace name of this bed."""
        self.switch = f"{self.prefix}-sw"
        """The switch's network namespace (bridge ``br0``, one port per host)."""
        self.hosts = [Host(self, i, f"host{i}", f"{subnet}.{i + 1}") for i in range(hosts)]
        self.processes: list[subprocess.Popen[Any]] = []
        """Every process started on a host (all killed and reaped by :meth:`close`)."""
        self.tmpdir: str | None = None
        """A folder for the bed's files (every host sees it), removed with the bed."""
        self._timers: list[threading.Timer] = []
        self._state = "new"

    @property
    def namespaces(self) -> list[str]:
        """The bed's network namespaces: the switch's and one per host."""
        return [self.switch, *(h.netns for h in self.hosts)]

    def __enter__(self) -> TestBed:
        return self.start()

    def __exit__(self, exc_type: object, *exc: object) -> None:
        try:
            self.close()
        except TestBedError:
            if exc_type is None:
                raise
            log.exception("test bed teardown failed (while handling another error)")

    # -- building ------------------------------------------------------------------
    def start(self) -> TestBed:
        """Remove what dead beds left behind, then build this one."""
        if self._state != "new":
            raise TestBedError(f"test bed {self.prefix} was already started")
        reason = available(delay=self.delay_ms > 0)
        if reason is not None:
            raise TestBedError(reason)
        removed = remove_leftovers()
        if removed:
            log.warning("removed %d namespace(s) left by dead test beds: %s", len(removed),
                        removed)
        self._state = "open"
        _register(self)
        try:
            self._build(time.monotonic() + self.timeout)
        except BaseException:
            self.close()
            raise
        return self

    def _build(self, deadline: float) -> None:
        self.tmpdir = tempfile.mkdtemp(prefix=self.prefix + "-")
        hosts_file = os.path.join(self.tmpdir, "hosts")
        with open(hosts_file, "w") as file:
            file.write("127.0.0.1 localhost\n::1 localhost\n")
            file.writelines(f"{h.address} {h.name}\n" for h in self.hosts)
        sw = self.switch
        cmd(["ip", "netns", "add", sw])
        cmd(["ip", "-n", sw, "link", "add", "name", "br0", "type", "bridge"])
        cmd(["ip", "-n", sw, "link", "set", "br0", "up"])
        for host in self.hosts:
            cmd(["ip", "netns", "add", host.netns])
            cmd(["ip", "-n", sw, "link", "add", "name", host.switch_port, "type", "veth",
                 "peer", "name", "eth0", "netns", host.netns])
            cmd(["ip", "-n", sw, "link", "set", host.switch_port, "master", "br0", "up"])
            cmd(["ip", "-n", host.netns, "addr", "add", f"{host.address}/24", "dev", "eth0"])
            cmd(["ip", "-n", host.netns, "link", "set", "lo", "up"])
            cmd(["ip", "-n", host.netns, "link", "set", "eth0", "up"])
            self._shape(host.netns, "eth0")
            self._shape(sw, host.switch_port)
            host._start_holder(hosts_file, deadline)
        for host in self.hosts:
            self._wait_link(host, deadline)

    def _shape(self, netns: str, dev: str) -> None:
        base = ["tc", "-n", netns, "qdisc", "add", "dev", dev]
        tbf = [] if self.rate is None else [
            "tbf", "rate", self.rate, "burst", self.burst, "latency", self.latency]
        if self.delay_ms > 0:
            # netem holds the packets for the delay, its child tbf paces them (tc-netem(8)).
            cmd([*base, "root", "handle", "1:", "netem", "delay", f"{self.delay_ms}ms",
                 "limit", "100000"])
            if tbf:
                cmd([*base, "parent", "1:1", "handle", "10:", *tbf])
        elif tbf:
            cmd([*base, "root", "handle", "1:", *tbf])

    def _link_up(self, host: Host) -> bool:
        """Both ends up and the switch port forwarding."""
        end = json.loads(cmd(["ip", "-j", "-n", host.netns, "link", "show", "dev",
                              "eth0"]).stdout)[0]
        port = json.loads(cmd(["ip", "-j", "-d", "-n", self.switch, "link", "show", "dev",
                               host.switch_port]).stdout)[0]
        state = port.get("linkinfo", {}).get("info_slave_data", {}).get("state")
        return bool(end.get("operstate") == "UP" and state == "forwarding")

    def _wait_link(self, host: Host, deadline: float) -> None:
        _poll(lambda: self._link_up(host), deadline, f"{host.name}'s link to come up")

    # -- faults --------------------------------------------------------------------
    def cut(self, index: int) -> None:
        """Take host ``index``'s link down (``ip link set eth0 down`` on the host): its
        traffic stops both ways until :meth:`restore`."""
        host = self._host(index)
        cmd(["ip", "-n", host.netns, "link", "set", "eth0", "down"])

    def restore(self, index: int, timeout: float = _LINK_WAIT_S) -> None:
        """Bring host ``index``'s link up again; returns once it forwards."""
        host = self._host(index)
        cmd(["ip", "-n", host.netns, "link", "set", "eth0", "up"])
        self._wait_link(host, time.monotonic() + timeout)

    def flap(self, index: int, down_s: float) -> threading.Timer:
        """Cut host ``index`` now and restore it ``down_s`` seconds later (in a timer
        thread; ``join`` the returned timer to wait for the restore)."""
        self.cut(index)
        return self._later(down_s, lambda: self.restore(index),
                           f"restoring host {index} after a flap")

    def throttle(self, index: int, rate: str, seconds: float) -> threading.Timer:
        """Drop host ``index``'s link rate to ``rate`` both ways now (a congestion
        spike), and back to the bed's rate ``seconds`` later (in a timer thread)."""
        if self.rate is None:
            raise TestBedError("throttle() needs a bed with a rate (its links are unshaped)")
        host = self._host(index)
        self._set_rate(host, rate)
        base = self.rate
        return self._later(seconds, lambda: self._set_rate(host, base),
                           f"restoring host {index}'s rate after a throttle")

    def _later(self, seconds: float, undo: Callable[[], None], what: str) -> threading.Timer:
        """Run ``undo`` in a timer thread ``seconds`` from now, if the bed is still open
        (a failure is logged: nobody waits on the timer's thread)."""

        def run() -> None:
            if self._state == "open":
                try:
                    undo()
                except TestBedError:
                    log.exception("%s failed", what)

        timer = threading.Timer(seconds, run)
        timer.daemon = True
        self._timers.append(timer)
        timer.start()
        return timer

    def _set_rate(self, host: Host, rate: str) -> None:
        where = ["parent", "1:1", "handle", "10:"] if self.delay_ms > 0 else [
            "root", "handle", "1:"]
        for netns, dev in ((host.netns, "eth0"), (self.switch, host.switch_port)):
            cmd(["tc", "-n", netns, "qdisc", "change", "dev", dev, *where, "tbf", "rate",
                 rate, "burst", self.burst, "latency", self.latency])

    def _host(self, index: int) -> Host:
        if self._state != "open":
            raise TestBedError(f"test bed {self.prefix} is not running")
        return self.hosts[index]

    # -- processes -----------------------------------------------------------------
    def _spawn(self, argv: list[str], kwargs: dict[str, Any]) -> subprocess.Popen[Any]:
        if self._state != "open":
            raise TestBedError(f"test bed {self.prefix} is not running")
        proc = subprocess.Popen(argv, **kwargs)
        self.processes.append(proc)
        return proc

    # -- teardown ------------------------------------------------------------------
    def close(self) -> None:
        """Kill every process started on the hosts, then remove every namespace (and so
        every link) of the bed; idempotent. SIGINT/SIGTERM arriving meanwhile are held
        back until it is done.

        Raises:
            TestBedError: something of the bed survived (named).
        """
        if self._state != "open":
            self._state = "closed"
            return
        self._state = "closed"
        pending: list[int] = []
        saved = _hold_signals(pending)
        try:
            problems = self._teardown()
        finally:
            for sig, handler in saved.items():
                signal.signal(sig, handler)
            _unregister(self)
            for sig in pending:
                signal.raise_signal(sig)
        if problems:
            raise TestBedError(f"teardown of test bed {self.prefix}: " + "; ".join(problems))

    def _teardown(self) -> list[str]:
        problems: list[str] = []
        for timer in self._timers:
            timer.cancel()
        for timer in self._timers:
            timer.join(_KILL_WAIT_S)
        for proc in self.processes:
            _kill(proc)
        holders = [p for p in (h._stop_holder() for h in self.hosts) if p is not None]
        # Whatever else runs on the hosts (children in sessions of their own) is killed
        # with the namespaces.
        for name in self.namespaces:
            try:
                problems += delete_namespace(name, _KILL_WAIT_S)
            except TestBedError as exc:
                problems.append(str(exc))
        for proc in [*self.processes, *holders]:
            try:
                proc.wait(_KILL_WAIT_S)
            except subprocess.TimeoutExpired:
                problems.append(f"pid {proc.pid} ({proc.args!r}) did not exit")
        for proc in holders:
            for pipe in (proc.stdin, proc.stdout):
                if pipe is not None:
                    pipe.close()
        try:
            left = list_namespaces(self.prefix + "-")
        except TestBedError as exc:
            left = [str(exc)]
        if left:
            problems.append(f"namespaces still listed: {left}")
        if self.tmpdir is not None:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
        return problems


# -- helpers ---------------------------------------------------------------------------
def _kill(proc: subprocess.Popen[Any]) -> None:
    """SIGKILL a started process and its process group if it leads one."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        if os.getpgid(proc.pid) == proc.pid:
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()


def _drain(proc: subprocess.Popen[Any]) -> tuple[Any, Any]:
    """What a killed process had left in its pipes (bounded), reaping it."""
    try:
        return proc.communicate(timeout=_KILL_WAIT_S)
    except subprocess.TimeoutExpired:  # a grandchild in another session holds a pipe
        return None, None


def _read_line(fd: int, deadline: float) -> bytes:
    """Bytes from ``fd`` up to a newline, EOF or ``deadline``."""
    data = b""
    while not data.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data


def _poll(condition: Callable[[], bool], deadline: float, what: str) -> None:
    """Check ``condition`` every 10 ms until it holds; past ``deadline``, raise."""
    while not condition():
        if time.monotonic() > deadline:
            raise TestBedError(f"timed out waiting for {what}")
        time.sleep(0.01)


# -- open beds, exit and signals -------------------------------------------------------
_OPEN: set[TestBed] = set()
_LOCK = threading.RLock()  # re-entered by the SIGTERM handler
_sigterm_ours = False  # whether _on_sigterm is installed (in place of SIG_DFL)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    """SIGTERM with a bed open: tear the beds down, then die of SIGTERM as before."""
    _close_all()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.raise_signal(signal.SIGTERM)


def _register(bed: TestBed) -> None:
    global _sigterm_ours
    with _LOCK:
        _OPEN.add(bed)
        if _in_main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _on_sigterm)
            _sigterm_ours = True


def _unregister(bed: TestBed) -> None:
    global _sigterm_ours
    with _LOCK:
        _OPEN.discard(bed)
        if not _OPEN and _sigterm_ours and _in_main_thread():
            if signal.getsignal(signal.SIGTERM) is _on_sigterm:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
            _sigterm_ours = False


def _hold_signals(pending: list[int]) -> dict[int, Any]:
    """Replace the SIGINT/SIGTERM handlers by a recorder (main thread only); returns
    the handlers to put back."""
    if not _in_main_thread():
        return {}

    def record(signum: int, frame: FrameType | None) -> None:
        pending.append(signum)

    return {sig: signal.signal(sig, record) for sig in (signal.SIGINT, signal.SIGTERM)}


def _close_all() -> None:
    for bed in list(_OPEN):
        try:
            bed.close()
        except TestBedError:
            log.exception("test bed teardown at exit failed")


atexit.register(_close_all)
