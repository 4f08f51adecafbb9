"""Parameter counts of a config without allocating the model (meta device)."""

from __future__ import annotations

import torch

from ..config import ModelConfig
from .transformer import LM


def count_params(cfg: ModelConfig) -> dict[str, int]:
    """``{"total": int, "trainable": int}``; frozen experts count in the total only."""
    with torch.device("meta"):
        model = LM(cfg)
    return model.param_counts()
