"""The dense FFN: GELU/ReLU MLP with biases (gpt2) or SwiGLU without (smollm)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...config import ModelConfig
from .base import FFN
from .registry import register_ffn


def activation_fn(name: str):
    return {"gelu": F.gelu, "relu": F.relu}[name]


@register_ffn("dense")
class DenseFFN(FFN):
    def __init__(self, cfg: ModelConfig, layer_idx: int = 0):
        super().__init__()
        hidden = cfg.ffn_hidden
        self.swiglu = cfg.activation == "swiglu"
        bias = cfg.bias and not self.swiglu
        self.fc_in = nn.Linear(cfg.d_model, hidden, bias=bias)
        # SwiGLU: down(silu(gate(x)) * up(x)); fc_gate is the extra projection
        self.fc_gate = nn.Linear(cfg.d_model, hidden, bias=False) if self.swiglu else None
        self.fc_out = nn.Linear(hidden, cfg.d_model, bias=bias)
        self.fc_out.is_residual_projection = True
        self.act = None if self.swiglu else activation_fn(cfg.activation)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x_BTD: torch.Tensor, valid_BT: torch.Tensor | None = None) -> tuple[torch.Tensor, None]:
        if self.swiglu:  # valid_BT: no statistics here, every position is computed alike
            h = F.silu(self.fc_gate(x_BTD)) * self.fc_in(x_BTD)
        else:
            h = self.act(self.fc_in(x_BTD))
        return self.dropout(self.fc_out(h)), None
