from .base import Callback
from .checkpointing import CheckpointCallback
from .metrics_log import MetricsLogger
from .self_organize import SelfOrganizeCallback

__all__ = ["Callback", "CheckpointCallback", "MetricsLogger", "SelfOrganizeCallback"]
