"""Configuration of the SoME layer (see docs/some-layer.md, the specification)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .loading import ConfigError


@dataclass
class SoMEConfig:
    # --- shape ---------------------------------------------------------------
    num_experts: int = 64
    top_k: int = 4
    d_ffn: int = 512  # width of every frozen expert
    expert_bias: bool = True  # W1, b1, W2, b2 per expert (the seeds' parameter count needs biases)
    # --- frozen experts ------------------------------------------------------
    init_method: Literal["sparse", "normal", "orthogonal"] = "sparse"
    sparsity: float = 0.9  # fraction of exact zeros per column for init_method=sparse
    expert_seed: int = 1234  # experts are a pure function of (seed, method, shapes)
    expert_dtype: Literal["fp32", "bf16"] = "fp32"  # storage/compute dtype of the frozen experts
    save_experts: Literal["seed", "weights"] = "seed"  # checkpoints store the seed (+hash) or the weights
    lora_rank: int = 0  # LoRA adapters on experts (0 = off)
    lora_alpha: float = 1.0
    # --- router --------------------------------------------------------------
    query_net: Literal["linear", "mlp"] = "linear"
    query_hidden: int = 0  # hidden width of the mlp query net; 0 = d_model
    score: Literal["dot", "cosine"] = "dot"  # cosine is implied by key_norm
    router_temperature_train: float = 1.0
    router_temperature_eval: float = 0.5
    learnable_tau: bool = False
    topk_warmup: float = 0.0  # fraction of training with k=1, then linear ramp to top_k
    topk_ramp: float = 0.0  # fraction of training spent ramping from 1 to top_k after the warmup
    aux_loss_coef: float = 0.0  # Switch-style balance loss E*sum(f*P); off by default
    # --- self-organization rules (each has a switch) -------------------------
    attraction: bool = True
    alpha: float = 0.015
    alpha_floor: float = 0.005
    alpha_schedule: Literal["constant", "cosine"] = "cosine"
    peer: bool = True
    gamma: float = 0.0
    repulsion: bool = True
    beta: float = 0.001
    beta_final: float = -1.0  # -1 = no annealing; else beta anneals to this value
    beta_schedule: Literal["constant", "cosine", "linear"] = "constant"
    usage_ema: bool = True
    ema_decay: float = 0.995
    decay: bool = True
    delta: float = 0.001
    theta: float = 0.0  # absolute threshold in routed slots per step (the MVP runs: 200); 0 = use percentile
    theta_percentile: float = 0.05  # bottom fraction of experts by usage counted dormant
    # --- stability controls ----------------------------------------------------
    key_norm: bool = True  # L2-normalise keys after every update (cosine scoring)
    delta_clip: float = 0.0  # cap on ||dk_e|| per update; 0 = off
    key_ema: float = 0.0  # route with an EMA of the keys with this decay; 0 = off
    som_warmup_steps: int = 0  # rates ramp linearly from 0 over these steps
    entropy_band: tuple[float, float] = (0.0, 0.0)  # target gate-entropy band in nats; (0,0) = off
    entropy_band_rate: float = 0.01
    update_every: int = 1  # apply the rules every N optimizer steps
    update_token_fraction: float = 1.0  # subsample tokens for the statistics
    adapt_at_inference: bool = False  # let eval move keys (ablation C)

    def validate(self) -> None:
        if self.num_experts <= 0 or self.top_k <= 0 or self.d_ffn <= 0:
            raise ConfigError("model.some.num_experts, top_k and d_ffn must be positive")
        if self.top_k > self.num_experts:
            raise ConfigError(
                f"model.some.top_k={self.top_k} exceeds model.some.num_experts={self.num_experts}; "
                f"lower top_k or add experts"
            )
        if not 0.0 <= self.sparsity < 1.0:
            raise ConfigError(f"model.some.sparsity={self.sparsity} must be in [0, 1)")
        if not 0.0 < self.update_token_fraction <= 1.0:
            raise ConfigError("model.some.update_token_fraction must be in (0, 1]")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"model.some.ema_decay={self.ema_decay} must be in [0, 1)")
        if self.update_every < 1:
            raise ConfigError("model.some.update_every must be >= 1")
        if self.router_temperature_train <= 0 or self.router_temperature_eval <= 0:
            raise ConfigError("router temperatures must be positive")
