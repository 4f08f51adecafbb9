"""The language model: attention, block, LM. One backbone family, FFN by name.

``gpt2``: LayerNorm, GELU MLP, biases, positions learned/sinusoidal/RoPE/none.
``smollm``: RMSNorm, RoPE, SwiGLU, no biases. The FFN of each block comes from
the registry (``model.ffn``), so dense, MoE and SoME share everything else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import ModelConfig
from .ffn import FFN, SelfOrganizing, build_ffn, recomputing
from .layers import KVCache, Rotary, apply_rotary, build_norm, sinusoidal_table
from .loss import token_cross_entropy

IGNORE_INDEX = -100  # targets with this value (padding) never count in the loss


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        bias = cfg.bias and cfg.backbone == "gpt2"
        self.n_heads, self.head_dim, self.layer_idx = cfg.n_heads, cfg.head_dim, layer_idx
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=bias)
        self.proj.is_residual_projection = True
        self.dropout = cfg.dropout
        self.attn_dropout = cfg.attn_dropout

    def forward(self, x_BTD: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                cache: KVCache | None) -> torch.Tensor:
        B, T, D = x_BTD.shape
        q, k, v = self.qkv(x_BTD).split(D, dim=2)
        q, k, v = (t.view(B, T, self.n_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if cache is None:
            y = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, dropout_p=self.attn_dropout if self.training else 0.0)
        else:
            mask = cache.attention_mask(T, q.dtype)
            k, v = cache.update(self.layer_idx, k, v)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).reshape(B, T, D)
        return F.dropout(self.proj(y), self.dropout, self.training)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.norm1 = build_norm(cfg.backbone, cfg.d_model, cfg.norm_eps, cfg.bias)
        self.attn = CausalSelfAttention(cfg, layer_idx)
        self.norm2 = build_norm(cfg.backbone, cfg.d_model, cfg.norm_eps, cfg.bias)
        self.ffn: FFN = build_ffn(cfg, layer_idx)

    def forward(self, x_BTD: torch.Tensor, rope=None, cache: KVCache | None = None,
                valid_BT: torch.Tensor | None = None):
        """``valid_BT``: the positions routing statistics may count (None: all), passed to the FFN."""
        x_BTD = x_BTD + self.attn(self.norm1(x_BTD), rope, cache)
        h_BTD = self.norm2(x_BTD)
        y_BTD, aux = self.ffn(h_BTD) if valid_BT is None else self.ffn(h_BTD, valid_BT)
        return x_BTD + y_BTD, aux


@dataclass
class LMOutput:
    logits: torch.Tensor  # (B, T, V); only the last position when asked for
    loss: torch.Tensor | None = None  # mean CE over counted targets + aux losses
    ce_loss: torch.Tensor | None = None  # mean CE alone (what eval reports)
    aux_loss: torch.Tensor | None = None


def _no_recompute_context():
    import contextlib

    return contextlib.nullcontext(), recomputing()


class LM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        if cfg.positions == "learned":
            self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        elif cfg.positions == "sinusoidal":
            self.register_buffer("pos_table", sinusoidal_table(cfg.max_seq_len, cfg.d_model), persistent=False)
        self.rotary = Rotary(cfg.head_dim, cfg.max_seq_len, cfg.rope_base) if cfg.positions == "rope" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm_f = build_norm(cfg.backbone, cfg.d_model, cfg.norm_eps, cfg.bias)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.tok_emb.weight
        self.activation_checkpointing = False
        self.apply(self._init_weights)
        for block in self.blocks:  # FFNs with their own init (frozen experts) go last
            if hasattr(block.ffn, "init_weights"):
                block.ffn.init_weights()

    def _init_weights(self, module: nn.Module) -> None:
        std = self.cfg.init_std
        if isinstance(module, nn.Linear):
            if getattr(module, "is_residual_projection", False):
                std = std / math.sqrt(2 * self.cfg.n_layers)  # GPT-2: keep the residual stream's variance
            nn.init.normal_(module.weight, 0.0, std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, 0.0, std)

    def extend_context(self, max_len: int) -> None:
        """Accept windows of up to ``max_len`` tokens (for scoring at a longer context than trained).

        RoPE and sinusoidal tables are computed, so they extend; positions past the trained length were
        never trained on, so such scores measure how the model extrapolates. Learned position
        embeddings have no rows there: ``ValueError``."""
        if max_len <= self.cfg.max_seq_len:
            return
        if self.cfg.positions == "learned":
            raise ValueError(f"learned position embeddings stop at model.max_seq_len={self.cfg.max_seq_len}")
        device = self.tok_emb.weight.device
        if self.cfg.positions == "sinusoidal":
            self.pos_table = sinusoidal_table(max_len, self.cfg.d_model).to(device)
        if self.rotary is not None:
            self.rotary = Rotary(self.cfg.head_dim, max_len, self.cfg.rope_base).to(device)
        self.cfg = replace(self.cfg, max_seq_len=max_len)

    # --- forward -----------------------------------------------------------
    def forward(self, idx_BT: torch.Tensor, targets_BT: torch.Tensor | None = None,
                cache: KVCache | None = None, pos_BT: torch.Tensor | None = None,
                last_only: bool = False) -> LMOutput:
        B, T = idx_BT.shape
        if pos_BT is None:
            start = cache.length if cache is not None else 0
            if start + T > self.cfg.max_seq_len:
                raise ValueError(f"sequence of {start + T} tokens exceeds model.max_seq_len={self.cfg.max_seq_len}")
            pos_BT = torch.arange(start, start + T, device=idx_BT.device).expand(B, T)
        x = self.tok_emb(idx_BT)
        if self.cfg.positions == "learned":
            x = x + self.pos_emb(pos_BT)
        elif self.cfg.positions == "sinusoidal":
            x = x + self.pos_table[pos_BT].to(x.dtype)
        rope = self.rotary(pos_BT) if self.rotary is not None else None
        x = self.drop(x)
        # PAD positions (targets IGNORE_INDEX) are computed but feed no routing statistic, tally or aux loss
        valid_BT = None if targets_BT is None else targets_BT != IGNORE_INDEX
        aux_total = None
        for block in self.blocks:
            if self.activation_checkpointing and self.training and cache is None:
                x, aux = checkpoint(block, x, rope, None, valid_BT, use_reentrant=False,
                                    context_fn=_no_recompute_context)
            else:
                x, aux = block(x, rope, cache, valid_BT)
            if aux is not None:
                aux_total = aux if aux_total is None else aux_total + aux
        if cache is not None:
            cache.advance(T)
        x = self.norm_f(x)
        if last_only:
            x = x[:, -1:]
        logits = self.head(x)
        if targets_BT is None:
            return LMOutput(logits=logits, aux_loss=aux_total)
        ce = token_cross_entropy(logits.view(-1, logits.size(-1)), targets_BT.reshape(-1), IGNORE_INDEX)
        loss = ce if aux_total is None else ce + aux_total
        return LMOutput(logits=logits, loss=loss, ce_loss=ce, aux_loss=aux_total)

    # --- hooks for the trainer and the evaluator --------------------------------
    def ffns(self) -> list[FFN]:
        return [block.ffn for block in self.blocks]

    def self_organizing_layers(self) -> list[SelfOrganizing]:
        return [f for f in self.ffns() if isinstance(f, SelfOrganizing)]

    def set_progress(self, step: int, total_steps: int) -> None:
        for ffn in self.ffns():
            ffn.set_progress(step, total_steps)

    def reset_readouts(self) -> None:
        for ffn in self.ffns():
            ffn.reset_readouts()

    def readouts(self) -> dict[str, float]:
        """Per-layer FFN statistics as flat ``layer{i}/{name}`` keys."""
        out = {}
        for i, ffn in enumerate(self.ffns()):
            for key, value in ffn.readouts().items():
                out[f"layer{i}/{key}"] = value
        return out

    def param_counts(self) -> dict[str, int]:
        """Total and trainable parameters (a tied head counted once), frozen buffers included."""
        seen, total, trainable = set(), 0, 0
        for p in self.parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            total += p.numel()
            trainable += p.numel() if p.requires_grad else 0
        procedural = 0
        for ffn in self.ffns():  # frozen experts kept as buffers still count as model parameters
            total += getattr(ffn, "frozen_param_count", lambda: 0)()
            procedural += getattr(ffn, "procedural_param_count", lambda: 0)()
        counts = {"total": total, "trainable": trainable}
        if procedural:  # experts computed on demand: parameters of the model, held nowhere
            counts.update(stored=total, procedural=procedural, total=total + procedural)
        return counts


def build_model(cfg: ModelConfig, device: str | torch.device = "cpu") -> LM:
    with torch.device(device):
        return LM(cfg)
