"""The classic sparsely-gated MoE baseline (Shazeer et al. 2017): trainable experts, noisy top-k gating.

Forward over the T tokens of a batch (``model.ffn: moe``, settings in ``model.moe``)::

    H(x) = x W_g + eps * softplus(x W_noise)    eps ~ N(0, 1); training forwards only, from noise_start_step
    I = topk(H, k); g = softmax(H_I)            softmax over the kept k
    y = sum_j g_j * Expert_{I_j}(x)             models/dispatch/, the dispatch shared with SoME

Experts are stacked trainable parameters run by ``grouped_mlp`` (GELU/ReLU with
biases, ``gpt2``) or ``grouped_swiglu`` (``smollm``). The router runs in fp32
even under autocast: bf16 logits tie and flip the top-k choice.

Router and noise weights start at zero (Shazeer et al., appendix A): at
initialization the noise alone spreads the tokens, and an upcycled layer
(``somoe.experiments.upcycle``) with identical experts and a zero router has uniform
gates, so it computes exactly the dense FFN it was copied from.

With ``capacity_factor > 0`` each expert keeps at most ``ceil(cf * T * k / E)``
slots, every token's first choice before any second choice (GShard's
priority) and in token order within a choice rank. A dropped slot contributes
nothing (the residual carries the token); the remaining gates are not
renormalized. Dropped slots are still computed by the dispatch (their gate is
zero): the capacity here models the routing semantics, not the compute saving.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...config import ModelConfig
from ..dispatch import Counts, compute_dtype, dispatch, expert_counts, grouped_mlp, grouped_swiglu, slot_counts
from .base import FFN, in_recompute
from .dense import activation_fn
from .registry import register_ffn
from .routing_tally import RoutingTally


def cv_squared(x_E: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation ``var / mean^2`` (population variance, as tensor2tensor's)."""
    mean = x_E.mean()
    return ((x_E - mean) ** 2).mean() / (mean ** 2 + 1e-10)


def switch_loss(logits_TE: torch.Tensor, counts_E: torch.Tensor, weight_T: torch.Tensor | None = None) -> torch.Tensor:
    """Switch Transformer balance ``E * sum_e f_e P_e``: f_e the share of routed slots, P_e the mean
    router probability (softmax over all E logits, in fp32); 1 when balanced. With ``weight_T`` (1 for
    counted tokens, 0 for PAD) both are taken over the counted tokens only (``counts_E``: theirs)."""
    E = logits_TE.shape[-1]
    probs_TE = torch.softmax(logits_TE.float(), dim=-1)
    P_E = probs_TE.mean(0) if weight_T is None else (weight_T @ probs_TE) / weight_T.sum().clamp_min(1.0)
    return E * (counts_E.float() / counts_E.sum().clamp_min(1.0) * P_E).sum()


def capacity_keep(idx_TK: torch.Tensor, num_experts: int, capacity_factor: float,
                  counts_E: torch.Tensor | None = None) -> torch.Tensor | None:
    """Boolean ``(T, K)`` mask of the slots that fit their expert's capacity; None when dropless.
    ``counts_E``: slots per expert when the caller has them."""
    if capacity_factor <= 0:
        return None
    T, K = idx_TK.shape
    capacity = math.ceil(capacity_factor * T * K / num_experts)
    flat_S = idx_TK.t().reshape(-1)  # priority order: all first choices (token order), then second choices
    order_S = torch.argsort(flat_S, stable=True)
    counts_E = expert_counts(flat_S, num_experts) if counts_E is None else counts_E
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    rank_S = torch.empty_like(order_S)
    rank_S[order_S] = torch.arange(flat_S.numel(), device=flat_S.device) - starts_E[flat_S[order_S]]
    return (rank_S < capacity).view(K, T).t()


@register_ffn("moe")
class MoELayer(FFN):
    """Noisy top-k MoE with trainable experts, an aux balancing loss and an optional capacity."""

    def __init__(self, cfg: ModelConfig, layer_idx: int = 0):
        super().__init__()
        self.cfg = c = cfg.moe
        self.layer_idx, self.d_model = layer_idx, cfg.d_model
        self.init_std, self.n_layers = cfg.init_std, cfg.n_layers
        E, D, F_ = c.num_experts, cfg.d_model, c.d_ffn or cfg.ffn_hidden
        self.d_ffn = F_
        self.swiglu = cfg.activation == "swiglu"
        bias = cfg.bias and not self.swiglu  # the dense FFN's rule, so upcycling copies biases one to one
        self.router = nn.Linear(D, E, bias=False)
        self.noise = nn.Linear(D, E, bias=False) if c.noisy_gating else None
        self.expert_w1 = nn.Parameter(torch.empty(E, D, F_))  # GELU/ReLU: in; SwiGLU: up
        self.expert_wg = nn.Parameter(torch.empty(E, D, F_)) if self.swiglu else None  # SwiGLU gate
        self.expert_w2 = nn.Parameter(torch.empty(E, F_, D))
        self.expert_b1 = nn.Parameter(torch.empty(E, F_)) if bias else None
        self.expert_b2 = nn.Parameter(torch.empty(E, D)) if bias else None
        for b in (self.expert_b1, self.expert_b2):
            if b is not None:
                b.no_weight_decay = True  # stacked biases are 2-D; the optimizer must not treat them as matrices
        self.act = None if self.swiglu else activation_fn(cfg.activation)
        self.dropout = nn.Dropout(cfg.dropout)
        # 1.0 once the noise has started: a compiled forward multiplies the noise by it (one graph)
        self.register_buffer("noise_on", torch.zeros(()), persistent=False)
        self.set_progress(0, 0)
        RoutingTally.attach(self, self.cfg.num_experts)
        # added to the clean logits when set (E,): upcycling's verification forces each expert in turn
        self.logit_offset: torch.Tensor | None = None
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """GPT-2 init of the experts (scaled output projection), zero router and noise weights."""
        if self.expert_w1.is_meta:
            return
        nn.init.normal_(self.expert_w1, 0.0, self.init_std)
        if self.expert_wg is not None:
            nn.init.normal_(self.expert_wg, 0.0, self.init_std)
        nn.init.normal_(self.expert_w2, 0.0, self.init_std / math.sqrt(2 * self.n_layers))
        for p in (self.expert_b1, self.expert_b2, self.router.weight,
                  self.noise.weight if self.noise is not None else None):
            if p is not None:
                p.zero_()

    # --- routing -------------------------------------------------------------------------
    def set_progress(self, step: int, total_steps: int) -> None:
        # a bool, not the step: torch.compile guards on what the forward reads (SoMELayer.set_progress)
        self._noise_started = step >= self.cfg.noise_start_step
        if not self.noise_on.is_meta:
            self.noise_on.fill_(float(self._noise_started))

    def noise_active(self) -> bool:
        return self.noise is not None and self.training and self._noise_started

    def _logits(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(routing logits H, clean logits x W_g, noise std or None), all fp32."""
        with torch.autocast(x_TD.device.type, enabled=False):
            x32 = x_TD.float()
            clean_TE = F.linear(x32, self.router.weight.float())
            if self.logit_offset is not None:
                clean_TE = clean_TE + self.logit_offset.to(clean_TE.device)
            if self.noise is not None and self.training and torch.compiler.is_compiling():
                # one graph before and after noise_start_step: the noise times the device flag (0 or 1)
                std_TE = F.softplus(F.linear(x32, self.noise.weight.float()))
                return clean_TE + torch.randn_like(clean_TE) * std_TE * self.noise_on, clean_TE, std_TE
            if not self.noise_active():
                if self.training and self.noise is not None:  # noise-free steps: W_noise stays in the graph
                    clean_TE = clean_TE + 0.0 * self.noise.weight.sum()  # (DDP needs a gradient for every weight)
                return clean_TE, clean_TE, None
            std_TE = F.softplus(F.linear(x32, self.noise.weight.float()))
            return clean_TE + torch.randn_like(clean_TE) * std_TE, clean_TE, std_TE

    def _select(self, logits_TE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        top_TK, idx_TK = logits_TE.topk(self.cfg.top_k, dim=-1)
        return idx_TK, torch.softmax(top_TK, dim=-1)

    @torch.no_grad()
    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert indices and gates (``x.shape[:-1] + (k,)``) as the current mode routes them."""
        logits_TE, _, _ = self._logits(x.reshape(-1, self.d_model))
        idx_TK, gates_TK = self._select(logits_TE)
        return idx_TK.view(*x.shape[:-1], -1), gates_TK.view(*x.shape[:-1], -1)

    # --- forward -------------------------------------------------------------------------
    def _experts(self, x_SD: torch.Tensor, counts: Counts) -> torch.Tensor:
        if self.swiglu:
            return grouped_swiglu(x_SD, counts, self.expert_wg, self.expert_w1, self.expert_w2)
        return grouped_mlp(x_SD, counts, self.expert_w1, self.expert_b1, self.expert_w2, self.expert_b2,
                           activation=self.act)

    def forward(self, x_BTD: torch.Tensor, valid_BT: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``valid_BT`` (bool, optional): PAD positions (False) are computed but stay out of the aux loss
        and the readouts (capacity, a routing semantic, still counts every token)."""
        x_TD = x_BTD.reshape(-1, self.d_model)
        logits_TE, clean_TE, std_TE = self._logits(x_TD)
        idx_TK, gates_TK = self._select(logits_TE)
        counts_E = expert_counts(idx_TK, self.cfg.num_experts)  # routed slots per expert, before drops
        keep_TK = capacity_keep(idx_TK, self.cfg.num_experts, self.cfg.capacity_factor, counts_E)
        combine_TK = gates_TK if keep_TK is None else gates_TK * keep_TK
        y_TD = dispatch(x_TD, idx_TK, combine_TK, self._experts, self.cfg.num_experts,
                        compute_dtype(x_TD, self.expert_w1.dtype), counts_E=counts_E)
        weight_T = None if valid_BT is None else valid_BT.reshape(-1).to(torch.float32)
        counted_E = counts_E if weight_T is None else slot_counts(idx_TK, self.cfg.num_experts, weight_T)
        aux = None
        if self.training and self.cfg.aux_loss != "none" and self.cfg.aux_loss_coef > 0:
            aux = self.aux_loss(logits_TE, clean_TE, std_TE, idx_TK, gates_TK, counted_E, weight_T)
        if not in_recompute():  # a checkpoint recompute has been counted by the first forward
            dropped = None
            if keep_TK is not None:
                dropped = (~keep_TK).sum() if weight_T is None else ((~keep_TK) * weight_T.unsqueeze(1)).sum().long()
            self._tally.add(counted_E, gates_TK, dropped, weight_T)
        return self.dropout(y_TD).view_as(x_BTD), aux

    def aux_loss(self, logits_TE: torch.Tensor, clean_TE: torch.Tensor, std_TE: torch.Tensor | None,
                 idx_TK: torch.Tensor, gates_TK: torch.Tensor, counts_E: torch.Tensor,
                 weight_T: torch.Tensor | None = None) -> torch.Tensor:
        """``coef`` times the chosen balancing loss (computed on the router's choice, before drops).

        ``switch``: ``E * sum_e f_e P_e`` with f_e the share of routed slots and
        P_e the mean router probability (softmax over all E logits); 1 when balanced.
        ``importance_load``: ``CV^2(importance) + CV^2(load)`` (Shazeer et al.):
        importance_e = sum of token gates to e; load_e = the smooth estimate
        ``sum_t P(e stays in the top k under resampled noise)`` while noise is on,
        else the routed slot count.
        """
        E, K = self.cfg.num_experts, self.cfg.top_k
        if self.cfg.aux_loss == "switch":
            loss = switch_loss(logits_TE, counts_E, weight_T)
        else:
            gates_TE = torch.zeros_like(logits_TE).scatter(1, idx_TK, gates_TK)
            importance_E = gates_TE.sum(0) if weight_T is None else weight_T @ gates_TE
            load_E = (counts_E.float() if std_TE is None or K >= E
                      else self._smooth_load(logits_TE, clean_TE, std_TE, weight_T))
            if std_TE is not None and K < E and torch.compiler.is_compiling():  # the noise may not have started
                load_E = torch.where(self.noise_on > 0, load_E, counts_E.float())
            loss = cv_squared(importance_E) + cv_squared(load_E)
        return self.cfg.aux_loss_coef * loss

    def _smooth_load(self, logits_TE: torch.Tensor, clean_TE: torch.Tensor, std_TE: torch.Tensor,
                     weight_T: torch.Tensor | None = None) -> torch.Tensor:
        """Shazeer's differentiable load: Phi((clean - threshold) / std), summed over tokens.

        The threshold an expert must beat is the k-th largest noisy logit of the
        others: the (k+1)-th overall if the expert is in the top k, else the k-th.
        """
        K = self.cfg.top_k
        top_TK1 = logits_TE.topk(K + 1, dim=-1).values
        in_TE = logits_TE > top_TK1[:, K:K + 1]
        threshold_TE = torch.where(in_TE, top_TK1[:, K:K + 1], top_TK1[:, K - 1:K])
        p_TE = torch.special.ndtr((clean_TE - threshold_TE) / std_TE)
        return p_TE.sum(0) if weight_T is None else weight_T @ p_TE

    # --- readouts (the SoME layer's, docs/some-layer.md section 4) ---------------------------
    def reset_readouts(self) -> None:
        self._tally.reset()

    def _apply(self, fn, recurse: bool = True):
        self._tally._apply(fn)  # the unregistered tally (RoutingTally.attach) follows .to()/.cuda()
        return super()._apply(fn, recurse)

    @torch.no_grad()
    def readouts(self) -> dict[str, float]:
        """Usage (routed slots) inequality, gate entropy and dropped share since ``reset_readouts``."""
        out = self._tally.summary()
        if not out:
            return {}
        out["dropped_pct"] = 100.0 * self._tally.dropped / (self._tally.tokens * self.cfg.top_k)
        out["top_k"] = float(self.cfg.top_k)
        return out
