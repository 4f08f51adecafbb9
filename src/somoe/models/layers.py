"""Building blocks shared by both backbones: norms, positions, KV cache."""

from __future__ import annotations

import math

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def build_norm(backbone: str, dim: int, eps: float, bias: bool) -> nn.Module:
    if backbone == "smollm":
        return RMSNorm(dim, eps)
    return nn.LayerNorm(dim, eps=eps, bias=bias)


def sinusoidal_table(max_len: int, dim: int) -> torch.Tensor:
    """The fixed sin/cos position table of Vaswani et al. (no parameters)."""
    pos = torch.arange(max_len, dtype=torch.float32)[:, None]
    inv = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(max_len, dim)
    table[:, 0::2] = torch.sin(pos * inv)
    table[:, 1::2] = torch.cos(pos * inv[: dim // 2])
    return table


class Rotary(nn.Module):
    """RoPE tables; ``forward(pos_BT)`` returns cos/sin of shape (B, 1, T, hs/2)."""

    def __init__(self, head_dim: int, max_len: int, base: float):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)  # (L, hs/2)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, pos_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[pos_BT].unsqueeze(1), self.sin[pos_BT].unsqueeze(1)


def apply_rotary(x_BHTS: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (first half, second half) of each head vector (GPT-NeoX / LLaMA layout)."""
    half = x_BHTS.shape[-1] // 2
    x1, x2 = x_BHTS[..., :half], x_BHTS[..., half:]
    cos, sin = cos.to(x_BHTS.dtype), sin.to(x_BHTS.dtype)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class KVCache:
    """Preallocated per-layer key/value buffers for incremental decoding.

    ``valid_BL`` marks real (non left-padding) positions so batched prompts of
    different lengths decode together.
    """

    def __init__(self, n_layers: int, batch: int, n_heads: int, max_len: int, head_dim: int,
                 device: torch.device, dtype: torch.dtype):
        shape = (batch, n_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.valid_BL = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.length = 0  # positions filled so far
        self.max_len = max_len
        self._mask: tuple[tuple, torch.Tensor] | None = None  # (key, mask) shared by the layers of one step

    def append_valid(self, valid_BT: torch.Tensor) -> None:
        t = valid_BT.shape[1]
        if self.length + t > self.max_len:
            raise ValueError(f"KV cache full: {self.length}+{t} > {self.max_len}; raise max_new_tokens budget")
        self.valid_BL[:, self.length:self.length + t] = valid_BT
        self._mask = None

    def update(self, layer: int, k_BHTS: torch.Tensor, v_BHTS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = k_BHTS.shape[2]
        self.k[layer][:, :, self.length:self.length + t] = k_BHTS
        self.v[layer][:, :, self.length:self.length + t] = v_BHTS
        end = self.length + t
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def attention_mask(self, t: int, dtype: torch.dtype) -> torch.Tensor:
        """Additive (B, 1, t, length+t) mask in ``dtype``: causal within the new tokens, padding hidden.

        Built once per step for all layers, and additive so that SDPA need not convert a
        boolean mask in every layer (at decode time these small ops are most of the cost).
        """
        key = (self.length, t, dtype)
        if self._mask is None or self._mask[0] != key:
            allowed = self._allowed(t)
            additive = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
            self._mask = key, additive.masked_fill_(~allowed, float("-inf"))
        return self._mask[1]

    def _allowed(self, t: int) -> torch.Tensor:
        end = self.length + t
        q_pos = torch.arange(self.length, end, device=self.valid_BL.device)
        k_pos = torch.arange(end, device=self.valid_BL.device)
        causal_TK = k_pos[None, :] <= q_pos[:, None]
        self_TK = k_pos[None, :] == q_pos[:, None]  # a padding query sees itself: no all-masked row, no NaN
        return (causal_TK[None, None] & self.valid_BL[:, None, None, :end]) | self_TK[None, None]

    def advance(self, t: int) -> None:
        self.length += t
