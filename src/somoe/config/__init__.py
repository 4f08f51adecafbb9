"""Run configuration: dataclasses, YAML presets, dotted overrides."""

from .loading import ConfigError, apply_overrides, from_dict, load_yaml, merge, to_dict
from .moe import MoEConfig
from .presets import list_presets, load_config, preset_path, save_config
from .schema import DataConfig, ModelConfig, RunConfig, TrainConfig
from .some import SoMEConfig

__all__ = [
    "ConfigError", "DataConfig", "ModelConfig", "MoEConfig", "RunConfig", "SoMEConfig", "TrainConfig",
    "apply_overrides", "from_dict", "list_presets", "load_config", "load_yaml", "merge", "preset_path",
    "save_config", "to_dict",
]
