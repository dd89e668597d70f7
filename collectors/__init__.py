"""Collectors for weight-sync: processes that act with the freshest policy, and the
learner-side group that drives them.

Example::

    from collectors import CollectorGroup
    from collectors.task import collect, make_env, make_policy

    policy = make_policy()
    with CollectorGroup(policy, make_env, make_policy, collect, num_collectors=2) as group:
        for batch in group:                  # each step tagged "policy_version"
            ...                              # train `policy`
            group.update_weights(timeout=30)

Collectors as Ray actors: ``collectors.ray_launcher.RayLauncher`` (the ``ray`` extra; not
imported here). Collectors started by someone else (torchrun, SLURM, a shell on another
host), batches back over the network: :class:`~collectors.remote.NetworkLauncher` and
``python -m collectors.remote``.
"""

from typing import TYPE_CHECKING, Any

from collectors.errors import (
    CollectorCrashed,
    CollectorDied,
    CollectorError,
    CollectorRefused,
    CollectorTimeout,
    PlacementTimeout,
)
from collectors.group import BatchRecord, CollectorGroup, RestartRecord
from collectors.launcher import Launcher, LocalLauncher, LocalWorker, WorkerHandle
from collectors.transport import decode_message, encode_message
from collectors.worker import (
    CHECKSUM_KEY,
    VERSION_KEY,
    WORKER_KEY,
    VersionTagger,
    WorkerSpec,
    policy_checksum,
    run_worker,
)

if TYPE_CHECKING:
    from collectors.remote import NetworkLauncher, RemoteWorker


def __getattr__(name: str) -> Any:
    # Imported on first use, so that `python -m collectors.remote` does not find its own
    # module already imported by this package (runpy warns, and runs it twice).
    if name in ("NetworkLauncher", "RemoteWorker"):
        from collectors import remote

        return getattr(remote, name)
    raise AttributeError(f"module 'collectors' has no attribute {name!r}")


__all__ = [
    "CollectorGroup", "BatchRecord", "RestartRecord", "WorkerSpec", "VersionTagger", "run_worker",
    "Launcher", "LocalLauncher", "LocalWorker", "WorkerHandle", "NetworkLauncher", "RemoteWorker",
    "CollectorError", "CollectorCrashed", "CollectorDied", "CollectorRefused", "CollectorTimeout",
    "PlacementTimeout",
    "VERSION_KEY", "WORKER_KEY", "CHECKSUM_KEY", "policy_checksum",
    "encode_message", "decode_message",
]
