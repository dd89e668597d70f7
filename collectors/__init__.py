"""Collectors for weight-sync: processes that act with the freshest policy, and the
learner-side group that drives them.

Example::

    from weight_sync.collectors import CollectorGroup
    from weight_sync.collectors.task import collect, make_env, make_policy

    policy = make_policy()
    with CollectorGroup(policy, make_env, make_policy, collect, num_collectors=2) as group:
        for batch in group:                  # each step tagged "policy_version"
            ...                              # train `policy`
            group.update_weights(timeout=30)

Collectors as Ray actors: ``weight_sync.collectors.ray_launcher.RayLauncher`` (the ``ray`` extra;
not
imported here). Collectors started by someone else (torchrun, SLURM, a shell on another
host), batches back over the network: :class:`~weight_sync.collectors.remote.NetworkLauncher` and
``python -m weight_sync.collectors.remote``.
"""

from typing import TYPE_CHECKING, Any

from weight_sync.collectors.batch_messages import decode_message, encode_message
from weight_sync.collectors.errors import (
    CollectorCrashed,
    CollectorDied,
    CollectorError,
    CollectorRefused,
    CollectorTimeout,
    PlacementTimeout,
)
from weight_sync.collectors.group import BatchRecord, CollectorGroup, RestartRecord
from weight_sync.collectors.launcher import Launcher, LocalLauncher, LocalWorker, WorkerHandle
from weight_sync.collectors.worker import (
    CHECKSUM_KEY,
    VERSION_KEY,
    WORKER_KEY,
    VersionTagger,
    WorkerSpec,
    policy_checksum,
    run_worker,
)

if TYPE_CHECKING:
    from weight_sync.collectors.remote import NetworkLauncher, RemoteWorker


def __getattr__(name: str) -> Any:
    # Imported on first use, so that `python -m weight_sync.collectors.remote` does not find its own
    # module already imported by this package (runpy warns, and runs it twice).
    if name in ("NetworkLauncher", "RemoteWorker"):
        from weight_sync.collectors import remote

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
