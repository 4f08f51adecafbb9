"""Configuration of the classic noisy top-k MoE baseline (Shazeer et al. 2017)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .loading import ConfigError


@dataclass
class MoEConfig:
    num_experts: int = 8
    top_k: int = 2
    d_ffn: int = 0  # expert width; 0 = the backbone's dense FFN width
    noisy_gating: bool = True  # H(x) = x W_g + eps * softplus(x W_noise) in training only
    noise_start_step: int = 0  # training forwards add the noise from this optimizer step on (transition: >= 1)
    aux_loss: Literal["switch", "importance_load", "none"] = "switch"
    aux_loss_coef: float = 0.01
    capacity_factor: float = 0.0  # 0 = dropless; else each expert keeps ceil(cf*T*k/E) slots, first choices first

    def validate(self) -> None:
        if self.num_experts <= 0 or self.top_k <= 0:
            raise ConfigError("model.moe.num_experts and top_k must be positive")
        if self.top_k > self.num_experts:
            raise ConfigError(
                f"model.moe.top_k={self.top_k} exceeds model.moe.num_experts={self.num_experts}; "
                f"lower top_k or add experts"
            )
        if self.capacity_factor < 0:
            raise ConfigError("model.moe.capacity_factor must be >= 0")
        if self.aux_loss_coef < 0:
            raise ConfigError(f"model.moe.aux_loss_coef={self.aux_loss_coef} must be >= 0")
        if self.d_ffn < 0 or self.noise_start_step < 0:
            raise ConfigError("model.moe.d_ffn and model.moe.noise_start_step must be >= 0")
