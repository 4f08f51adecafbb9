"""AdamW with decoupled weight decay groups, and the learning-rate schedules."""

from __future__ import annotations

import inspect
import math

import torch
from torch import nn

from ..config import TrainConfig


def build_optimizer(model: nn.Module, cfg: TrainConfig, device_type: str, capturable: bool = False
                    ) -> torch.optim.AdamW:
    """AdamW over trainable parameters only (frozen experts get no state); ``capturable`` for the
    compiled step (foreach kernels, step counts and learning rate on the device; fused AdamW is not
    traced by torch.compile).

    Matrices (linear weights, embeddings) decay; biases, norm gains and scalars
    such as a learnable temperature do not, as in GPT-2/nanoGPT.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    seen: set[int] = set()
    decay, no_decay = [], []
    for p in params:
        if id(p) in seen:  # a tied head appears twice
            continue
        seen.add(id(p))
        # stacked per-expert biases are 2-D: such tensors opt out with a ``no_weight_decay`` attribute
        (decay if p.dim() >= 2 and not getattr(p, "no_weight_decay", False) else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    kwargs = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    if capturable:
        kwargs.update(foreach=True, capturable=True)
    elif device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters:
        kwargs["fused"] = True
    return torch.optim.AdamW(groups, **kwargs)


def resolve_warmup(cfg: TrainConfig, total_steps: int) -> int:
    if cfg.warmup_steps >= 0:
        return min(cfg.warmup_steps, total_steps)
    return max(1, int(0.03 * total_steps)) if cfg.schedule != "constant" else 0


def lr_at(step: int, total_steps: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based); a pure function, so resume needs no state."""
    peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "onecycle":
        # torch's OneCycleLR defaults: 30% cosine ramp from lr/25, then cosine down to lr/(25*1e4)
        up = max(1, int(0.3 * total_steps))
        start, end = peak / 25.0, peak / 25.0 / 1e4
        if step < up:
            return start + (peak - start) * (1 - math.cos(math.pi * step / up)) / 2
        frac = min(1.0, (step - up) / max(1, total_steps - up))
        return end + (peak - end) * (1 + math.cos(math.pi * frac)) / 2
    warmup = resolve_warmup(cfg, total_steps)
    if step < warmup:
        return peak * (step + 1) / warmup
    if cfg.schedule == "constant":
        return peak
    frac = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    if cfg.schedule == "linear":
        return peak + (floor - peak) * frac
    return floor + (peak - floor) * (1 + math.cos(math.pi * frac)) / 2


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
