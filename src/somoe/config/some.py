"""Configuration of the SoME layer (see docs/some-layer.md, the specification)."""

from __future__ import annotations

import math
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
    expert_seed: int = 1234  # layer i draws its experts from a CPU generator seeded expert_seed + i
    expert_dtype: Literal["fp32", "bf16"] = "fp32"  # storage/compute dtype of the frozen experts
    # stored: every expert generated once and held (E x 2 x d_model x d_ffn); procedural: each routed expert's
    # weights computed on demand from (expert_seed, layer, expert id), never held (some_procedural.py)
    expert_storage: Literal["stored", "procedural"] = "stored"
    sign_bank_rows: int = 4096  # procedural: rows of each hashed sign table
    save_experts: Literal["seed", "weights"] = "seed"  # checkpoints store the seed (+hash) or the weights
    layer_scale: float = 0.0  # > 0: a trained per-channel gain on the layer's output, initialised to this (LayerScale)
    lora_rank: int = 0  # LoRA adapters on experts (0 = off)
    lora_alpha: float = 1.0
    # --- router --------------------------------------------------------------
    # exhaustive: every token scores all num_experts keys (E x d_model keys); product: num_experts = n^2
    # experts addressed by pairs of sub-keys, n per codebook, each head scoring 2n sub-keys (docs/some-layer.md)
    router: Literal["exhaustive", "product"] = "exhaustive"
    pk_heads: int = 1  # product: query heads, each retrieving top_k experts from the one shared pool
    pk_dim: int = 0  # product: sub-key width d_k (half of a head's query); 0 = d_model // (2 * pk_heads)
    # product: loss-free balancing; a per-sub-key bias added to the scores for selection only (never to the
    # gates) and moved by this step toward the mean load after each optimizer step (0 = off)
    selection_bias_rate: float = 0.0
    query_batchnorm: bool = False  # product: BatchNorm of the queries before the split (PAD positions ignored)
    query_net: Literal["linear", "mlp"] = "linear"
    query_hidden: int = 0  # hidden width of the mlp query net; 0 = d_model
    # fp32: the router (query net, scores, top-k, gates) runs in fp32 inside a bf16/fp16 autocast forward;
    # autocast: it follows the autocast like every other layer (docs/benchmarks.md compares the two)
    router_dtype: Literal["fp32", "autocast"] = "fp32"
    score: Literal["dot", "cosine"] = "dot"  # dot: q.K/sqrt(d); cosine (also implied by key_norm): unit q, unit K
    center_queries: bool = False  # score q - c (c: running mean query) so a direction shared by every token cannot decide the routing
    center_decay: float = 0.9  # per-update EMA decay of the query centre c
    router_temperature_train: float = 1.0
    router_temperature_eval: float = 0.5
    learnable_tau: bool = False  # a learnable log_tau multiplies both temperatures by exp(log_tau)
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
    usage_ema: bool = True  # off: usage is the last step's routed share alone
    ema_decay: float = 0.995
    decay: bool = True
    delta: float = 0.001
    theta: float = 0.0  # dormant if usage_ema * (slots routed this step) < theta (MVP runs: 200); 0 = percentile
    decay_target: Literal["mean", "sample"] = "mean"  # dormant keys move toward the mean query, or each toward a random query of the step (k-means re-seeding)
    theta_percentile: float = 0.05  # else the floor(p*E) least-used experts (strictly below the next) are dormant
    # --- stability controls ----------------------------------------------------
    key_norm: bool = True  # L2-normalise keys after every update (cosine scoring)
    delta_clip: float = 0.0  # cap on ||dk_e|| per update; 0 = off
    key_ema: float = 0.0  # route with an EMA of the keys with this decay; 0 = off
    som_warmup_steps: int = 0  # rates ramp linearly from 0 over these steps
    entropy_band: tuple[float, float] = (0.0, 0.0)  # target gate-entropy band in nats; (0,0) = off
    entropy_band_rate: float = 0.01  # log_tau step per update when the mean gate entropy leaves the band
    update_every: int = 1  # statistics and rules only on optimizer steps divisible by N (speed)
    update_token_fraction: float = 1.0  # statistics from this random fraction of tokens (speed)
    adapt_at_inference: bool = False  # eval forwards gather statistics too; the evaluator applies them (ablation C)

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
        if not 0.0 <= self.center_decay < 1.0:
            raise ConfigError(f"model.some.center_decay={self.center_decay} must be in [0, 1)")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"model.some.ema_decay={self.ema_decay} must be in [0, 1)")
        if self.update_every < 1:
            raise ConfigError("model.some.update_every must be >= 1")
        if self.router_temperature_train <= 0 or self.router_temperature_eval <= 0:
            raise ConfigError("router temperatures must be positive")
        self._validate_rules()

    def _validate_rules(self) -> None:
        for name in ("alpha", "alpha_floor", "gamma", "beta", "delta", "delta_clip", "theta", "lora_rank",
                     "aux_loss_coef", "entropy_band_rate", "som_warmup_steps", "query_hidden", "layer_scale"):
            if getattr(self, name) < 0:
                raise ConfigError(f"model.some.{name}={getattr(self, name)} must be >= 0")
        for name in ("alpha", "gamma", "delta"):
            if getattr(self, name) > 1:
                raise ConfigError(f"model.some.{name}={getattr(self, name)} must be <= 1 (a step toward a target)")
        if self.attraction and self.alpha_schedule == "cosine" and self.alpha_floor > self.alpha:
            raise ConfigError(f"model.some.alpha_floor={self.alpha_floor} exceeds alpha={self.alpha}; "
                              f"lower alpha_floor or use alpha_schedule=constant")
        if not 0.0 <= self.theta_percentile < 1.0:
            raise ConfigError(f"model.some.theta_percentile={self.theta_percentile} must be in [0, 1)")
        if not 0.0 <= self.key_ema < 1.0:
            raise ConfigError(f"model.some.key_ema={self.key_ema} must be in [0, 1) (0 = off)")
        if self.topk_warmup < 0 or self.topk_ramp < 0 or self.topk_warmup + self.topk_ramp > 1:
            raise ConfigError("model.some.topk_warmup and topk_ramp must be >= 0 and sum to at most 1")
        low, high = self.entropy_band
        if (low, high) != (0.0, 0.0):
            if not 0 <= low < high:
                raise ConfigError(f"model.some.entropy_band={list(self.entropy_band)} needs 0 <= low < high")
            if low >= math.log(self.top_k):
                raise ConfigError(f"model.some.entropy_band low={low} is unreachable: top_k={self.top_k} gates "
                                  f"have at most ln(top_k)={math.log(self.top_k):.3f} nats")
        self._validate_product_keys()
        self._validate_procedural()
        if self.lora_rank and self.lora_alpha <= 0:
            raise ConfigError(f"model.some.lora_alpha={self.lora_alpha} must be positive when lora_rank > 0")

    def _validate_product_keys(self) -> None:
        if self.router != "product":
            return
        n = self.subkeys_per_codebook
        if n * n != self.num_experts:
            raise ConfigError(f"model.some.router=product needs num_experts = n^2 (sub-key pairs); "
                              f"{self.num_experts} is not a square: use {n * n} or {(n + 1) ** 2}")
        if self.top_k > n:
            raise ConfigError(f"model.some.top_k={self.top_k} exceeds the {n} sub-keys per codebook of "
                              f"num_experts={self.num_experts}; lower top_k or add experts")
        if self.pk_heads <= 0 or self.pk_dim < 0:
            raise ConfigError("model.some.pk_heads must be positive and model.some.pk_dim >= 0")
        unsupported = {"gamma": self.peer and self.gamma > 0, "aux_loss_coef": self.aux_loss_coef > 0,
                       "topk_warmup": self.topk_warmup > 0}
        for name, on in unsupported.items():
            if on:
                raise ConfigError(f"model.some.{name} is not available with model.some.router=product; set it to 0")
        if self.selection_bias_rate < 0:
            raise ConfigError(f"model.some.selection_bias_rate={self.selection_bias_rate} must be >= 0")

    def _validate_procedural(self) -> None:
        if self.expert_storage != "procedural":
            return
        if self.init_method not in ("normal", "sparse"):
            raise ConfigError(f"model.some.expert_storage=procedural generates normal or sparse experts, not "
                              f"{self.init_method!r}; set model.some.init_method=normal")
        if self.expert_bias or self.lora_rank:
            raise ConfigError("model.some.expert_storage=procedural experts have no biases and no LoRA; set "
                              "model.some.expert_bias=false and model.some.lora_rank=0")
        rows = self.sign_bank_rows
        if rows < 2 or rows & (rows - 1):
            raise ConfigError(f"model.some.sign_bank_rows={rows} must be a power of two >= 2")

    @property
    def subkeys_per_codebook(self) -> int:
        """``n`` with ``num_experts = n^2`` (product router; rounded down when not a square)."""
        return math.isqrt(self.num_experts)

    def subkey_dim(self, d_model: int) -> int:
        return self.pk_dim or max(1, d_model // (2 * self.pk_heads))

    def query_width(self, d_model: int) -> int:
        """Width of the query: d_model (exhaustive) or heads x 2 halves x d_k (product)."""
        return 2 * self.pk_heads * self.subkey_dim(d_model) if self.router == "product" else d_model

    @property
    def slots_per_token(self) -> int:
        """Routed expert slots per token: top_k per head."""
        return self.top_k * (self.pk_heads if self.router == "product" else 1)

    @property
    def entropy_band_on(self) -> bool:
        return tuple(self.entropy_band) != (0.0, 0.0)

    @property
    def cosine_scores(self) -> bool:
        """Cosine routing scores: asked for, or implied by L2-normalised keys."""
        return self.score == "cosine" or self.key_norm

    def query_hidden_width(self, d_model: int) -> int:
        """Hidden width of the query net: 0 for the linear one, else ``query_hidden`` (0 = d_model)."""
        return (self.query_hidden or d_model) if self.query_net == "mlp" else 0
