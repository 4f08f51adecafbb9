"""Per-expert low-rank adapters (the LoRA ablation) on the host-count loop."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .activation import _ActivationOnAten
from .plan import per_expert


@dataclass
class LoRA:
    """Per-expert low-rank adapters: ``W1 + scale * A1 @ B1``, ``W2 + scale * A2 @ B2``."""

    a1_EDR: torch.Tensor
    b1_ERF: torch.Tensor
    a2_EFR: torch.Tensor
    b2_ERD: torch.Tensor
    scale: float


def _lora_mlp(x_SD, counts: list[int], w1_EDF, b1_EF, w2_EFD, b2_ED, lora: LoRA, activation, dt) -> torch.Tensor:
    """The LoRA ablation: plain autograd over per-expert ops (adapters are trainable)."""
    w1s, w2s = w1_EDF.unbind(0), w2_EFD.unbind(0)  # one gradient buffer per stacked tensor, not per expert
    b1s = b1_EF.unbind(0) if b1_EF is not None else None
    b2s = b2_ED.unbind(0) if b2_ED is not None else None
    ad = [t.to(dt).unbind(0) for t in (lora.a1_EDR, lora.b1_ERF, lora.a2_EFR, lora.b2_ERD)]

    def expert(e: int, x: torch.Tensor) -> torch.Tensor:
        h = torch.addmm(b1s[e], x, w1s[e]) if b1s is not None else x @ w1s[e]
        h = _ActivationOnAten.apply(h + lora.scale * ((x @ ad[0][e]) @ ad[1][e]), activation)
        y = torch.addmm(b2s[e], h, w2s[e]) if b2s is not None else h @ w2s[e]
        return y + lora.scale * ((h @ ad[2][e]) @ ad[3][e])

    return per_expert(expert)(x_SD, counts)
