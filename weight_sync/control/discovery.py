"""Finding the learner from an address, or from environment variables.

For collectors that a cluster tool starts (torchrun, srun, a Kubernetes job) rather
than the learner's own code: they know the learner's address and their own id from
the environment, and read the rest of :class:`~weight_sync.ConnectionInfo` from the
learner's store.

Example (a collector script started by ``torchrun --nproc-per-node 4 collector.py``
with ``WEIGHT_SYNC_ADDR=learner-host:29600`` in its environment)::

    info = info_from_env()                     # WEIGHT_SYNC_ADDR[, WEIGHT_SYNC_NAME]
    cid = collector_id_from_env()              # WEIGHT_SYNC_COLLECTOR_ID, else RANK
    receiver = WeightReceiver(policy, info, cid)
    receiver.connect(timeout=120)

The learner then listens on a port fixed in advance and an interface the collectors
can reach: ``WeightSender(policy, n, host="0.0.0.0", port=29600)``;
:func:`env_for_collectors` gives the variables to hand them.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from collections.abc import Mapping

from weight_sync.config import ConnectionInfo
from weight_sync.control.channel import Control
from weight_sync.errors import ConfigError

__all__ = ["ADDR_VAR", "NAME_VAR", "ID_VAR", "info_from_address", "info_from_env",
           "collector_id_from_env", "env_for_collectors", "address_towards"]

#: ``host:port`` of the learner's store.
ADDR_VAR = "WEIGHT_SYNC_ADDR"
#: Name of the weight stream (default ``policy``).
NAME_VAR = "WEIGHT_SYNC_NAME"
#: This collector's id; torchrun's ``RANK`` is used when it is not set.
ID_VAR = "WEIGHT_SYNC_COLLECTOR_ID"


def info_from_address(host: str, port: int, name: str = "policy",
                      timeout: float = 60.0) -> ConnectionInfo:
    """Read the :class:`ConnectionInfo` the learner published in its store.

    Raises:
        ConnectionFailed: no store answered at ``host:port`` within ``timeout``.
        WeightSyncTimeout: the store holds no stream called ``name``.
    """
    info = ConnectionInfo.from_json(Control.connect(host, port, name, timeout).read_info(timeout))
    # The address that just worked beats the one the learner advertises (its hostname,
    # when it binds every interface).
    return dataclasses.replace(info, host=host, port=port)


def _split_address(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError(f"{ADDR_VAR} must be host:port, got {value!r}")
    return host.strip("[]"), int(port)  # [::1]:29600 -> ::1


def info_from_env(environ: Mapping[str, str] | None = None,
                  timeout: float = 60.0) -> ConnectionInfo:
    """:func:`info_from_address` with the address in ``WEIGHT_SYNC_ADDR`` and the
    stream name in ``WEIGHT_SYNC_NAME`` (default ``policy``).

    Raises:
        ConfigError: ``WEIGHT_SYNC_ADDR`` is missing or not ``host:port``.
    """
    env = os.environ if environ is None else environ
    if ADDR_VAR not in env:
        raise ConfigError(f"{ADDR_VAR} is not set: it must hold the learner's host:port")
    host, port = _split_address(env[ADDR_VAR])
    return info_from_address(host, port, env.get(NAME_VAR, "policy"), timeout)


def collector_id_from_env(environ: Mapping[str, str] | None = None) -> int:
    """This collector's id: ``WEIGHT_SYNC_COLLECTOR_ID``, else torchrun's ``RANK``.

    Raises:
        ConfigError: neither is set, or the value is not a non-negative integer.
    """
    env = os.environ if environ is None else environ
    for var in (ID_VAR, "RANK"):
        if var in env:
            value = env[var]
            if not value.isdigit():
                raise ConfigError(f"{var} must be a non-negative integer, got {value!r}")
            return int(value)
    raise ConfigError(f"neither {ID_VAR} nor RANK is set: no collector id")


def env_for_collectors(info: ConnectionInfo) -> dict[str, str]:
    """The variables :func:`info_from_env` reads, for the learner to hand out."""
    host = f"[{info.host}]" if ":" in info.host else info.host
    return {ADDR_VAR: f"{host}:{info.port}", NAME_VAR: info.name}


def address_towards(host: str, port: int) -> str | None:
    """This host's address on the route to ``host`` (loopback for a local learner).

    A collector binds its gloo socket there, so the link uses the interface the store
    connection uses, and a loopback run never listens on a public interface. ``None``
    if the route cannot be found (gloo then picks its default interface).
    """
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0][0]
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect((host, port))  # UDP: picks a route, sends nothing
            return str(probe.getsockname()[0])
    except OSError:
        return None
