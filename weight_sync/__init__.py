"""weight-sync: keep many RL collectors current with a learner's policy weights.

The names a learner and a collector need, grouped by kind. The rest lives in its room:
:mod:`weight_sync.errors` (every typed error), :mod:`weight_sync.transports` (choosing
and writing transports), :mod:`weight_sync.training` (a data-parallel learner: its
sender and a rank-aware helper), :mod:`weight_sync.collectors` (ready-made collector
processes and launchers), :mod:`weight_sync.torchrl` (torchrl's collectors).
"""

# The two roles
from weight_sync.collector.receiver import WeightReceiver
from weight_sync.learner.sender import WeightSender

# Settings, and what a collector process is handed
from weight_sync.config import ConnectionInfo, ReceiverConfig, SenderConfig  # isort: skip
from weight_sync.control.discovery import info_from_env  # isort: skip

# Results
from weight_sync.metrics import AckResult, SyncStats  # isort: skip

# Errors (the base and the two a training loop handles; all of them in weight_sync.errors)
from weight_sync.errors import CollectorFailed, WeightSyncError, WeightSyncTimeout  # isort: skip

__all__ = [
    # roles
    "WeightSender", "WeightReceiver",
    # settings
    "SenderConfig", "ReceiverConfig", "ConnectionInfo", "info_from_env",
    # results
    "AckResult", "SyncStats",
    # errors
    "WeightSyncError", "WeightSyncTimeout", "CollectorFailed",
]
__version__ = "0.1.0"
