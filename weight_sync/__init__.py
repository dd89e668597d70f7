"""weight-sync: keep many RL collectors current with a learner's policy weights."""

from weight_sync.config import ConnectionInfo, ReceiverConfig, RelayConfig, SenderConfig
from weight_sync.data_parallel import DataParallelSender
from weight_sync.discovery import (
    collector_id_from_env,
    env_for_collectors,
    info_from_address,
    info_from_env,
)
from weight_sync.distributed_helper import DistributedHelper, slurm_environ
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
from weight_sync.hooks import ReceiverHooks
from weight_sync.layout import BufferLayout
from weight_sync.metrics import AckResult, SyncRecord, SyncStats
from weight_sync.receiver import WeightReceiver
from weight_sync.sender import WeightSender

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
