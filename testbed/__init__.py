"""A multi-host test bed: N simulated hosts on one machine, for tests and benchmarks.

Each host is a network namespace with its own hostname (UTS namespace), its own
``/dev/shm`` and ``/etc/hosts`` (mount namespace) and its own SysV IPC; the hosts are
joined by a Linux bridge in a "switch" namespace, one veth link each, shaped with tc in
both directions. Their addresses (``10.213.0.0/24``) exist only inside the bed, which
has no route anywhere else. Everything is removed when the bed closes (also on an
exception, Ctrl-C or SIGTERM), and what a killed bed left behind is removed by the
next one. Needs root and iproute2; :func:`available` says whether it can run here.

Not part of the installed library: import it from a checkout, like ``benchmarks``::

    import testbed
    if (reason := testbed.available()) is None:
        with testbed.TestBed(hosts=3, rate="1gbit") as bed:
            learner = bed.hosts[0].popen([sys.executable, "learner.py", bed.hosts[0].address])
            ...
"""

from testbed._system import TestBedError
from testbed.bed import Host, TestBed
from testbed.support import available, has_netem

__all__ = ["TestBed", "Host", "TestBedError", "available", "has_netem"]
