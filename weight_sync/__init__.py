"""weight-sync: keep many RL collectors current with a learner's policy weights."""

from weight_sync.collector.hooks import ReceiverHooks
from weight_sync.collector.receiver import WeightReceiver
from weight_sync.config import ConnectionInfo, ReceiverConfig, RelayConfig, SenderConfig
from weight_sync.control.discovery import (
    collector_id_from_env,
    env_for_collectors,
    info_from_address,
    info_from_env,
)
from weight_sync.errors import (
    AuthenticationError,
    ClosedError,
    CollectorFailed,
    ConfigError,
    ConnectionFailed,
    DuplicateCollectorError,
    IntegrityError,
    InvalidWeightsError,
    LayoutMismatchError,
    PeerGone,
    ProtocolError,
    WeightSyncError,
    WeightSyncTimeout,
)
from weight_sync.learner.data_parallel import DataParallelSender
from weight_sync.learner.sender import WeightSender
from weight_sync.metrics import AckResult, SyncRecord, SyncStats
from weight_sync.training import DistributedHelper, slurm_environ
from weight_sync.wire.layout import BufferLayout

__all__ = [
    "WeightSender", "WeightReceiver", "DataParallelSender", "DistributedHelper", "ConnectionInfo",
    "SenderConfig", "ReceiverConfig", "ReceiverHooks", "RelayConfig",
    "BufferLayout", "SyncRecord", "SyncStats",
    "WeightSyncError", "WeightSyncTimeout", "ConnectionFailed", "PeerGone",
    "LayoutMismatchError", "InvalidWeightsError", "ProtocolError", "ClosedError",
    "CollectorFailed", "ConfigError", "DuplicateCollectorError", "IntegrityError",
    "AuthenticationError", "AckResult",
    "info_from_env", "info_from_address", "collector_id_from_env", "env_for_collectors",
    "slurm_environ",
]
__version__ = "0.1.0"
