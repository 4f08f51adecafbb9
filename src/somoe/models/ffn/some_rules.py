"""SoME's self-organizing key rules and schedules as pure functions (spec section 3).

Each rule returns a key displacement ``delta_ED`` (or a new usage vector, or a
mask) from plain tensors, so tests can check it against hand computations and
the layer composes them in the spec's order. ``E`` experts, ``D`` = d_model.
Schedules take ``frac`` = step / total_steps in [0, 1].

Every rule also takes leading batch dimensions, one independent key set each: the
product-key router's codebooks are ``(G, n, d_k)`` (``G`` codebooks of ``n`` sub-keys),
and repulsion, usage and dormancy act within a codebook, never across.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ...config import SoMEConfig
from ..fp32_matmul import mm


# --- schedules ----------------------------------------------------------------------------
def cosine_between(start: float, end: float, frac: float) -> float:
    """``start`` at frac 0, ``end`` at frac 1, half-cosine in between."""
    frac = min(max(frac, 0.0), 1.0)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * frac))


def alpha_at(cfg: SoMEConfig, frac: float) -> float:
    """Attraction rate: constant, or cosine from ``alpha`` down to ``alpha_floor`` (never below it)."""
    if cfg.alpha_schedule == "constant":
        return cfg.alpha
    return max(cfg.alpha_floor, cosine_between(cfg.alpha, cfg.alpha_floor, frac))


def beta_at(cfg: SoMEConfig, frac: float) -> float:
    """Repulsion rate: ``beta`` annealed to ``beta_final`` (cosine or linear); ``beta_final < 0`` = constant."""
    if cfg.beta_schedule == "constant" or cfg.beta_final < 0:
        return cfg.beta
    if cfg.beta_schedule == "linear":
        frac = min(max(frac, 0.0), 1.0)
        return cfg.beta + (cfg.beta_final - cfg.beta) * frac
    return cosine_between(cfg.beta, cfg.beta_final, frac)


def som_ramp(step: int, warmup_steps: int) -> float:
    """Multiplier of every rate: ``step / warmup_steps`` (0 at step 0), 1 after the warmup."""
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, max(step, 0) / warmup_steps)


def top_k_at(cfg: SoMEConfig, step: int, total_steps: int) -> int:
    """k=1 for the first ``topk_warmup`` fraction of training, then a linear ramp to ``top_k``.

    The ramp lasts ``topk_ramp`` of training (0 = jump straight to ``top_k``);
    ``k = 1 + floor((top_k - 1) * r)`` with ``r`` the ramp's progress, so
    ``top_k`` is reached exactly at its end. Unknown progress (total 0) = ``top_k``.
    """
    if cfg.topk_warmup <= 0 or total_steps <= 0:
        return cfg.top_k
    frac = step / total_steps
    if frac < cfg.topk_warmup:
        return 1
    if cfg.topk_ramp <= 0:
        return cfg.top_k
    r = min(1.0, (frac - cfg.topk_warmup) / cfg.topk_ramp)
    return min(cfg.top_k, 1 + int(math.floor((cfg.top_k - 1) * r + 1e-9)))


# --- the rules -----------------------------------------------------------------------------
def attraction_delta(keys_ED: torch.Tensor, q_sum_ED: torch.Tensor, gate_mass_E: torch.Tensor,
                     alpha: float | torch.Tensor) -> torch.Tensor:
    """``alpha * (qbar_e - k_e)`` with ``qbar_e = Sq_e / G_e``, for experts with ``G_e > 0`` (else 0)."""
    used_E = gate_mass_E > 0
    qbar_ED = q_sum_ED / gate_mass_E.clamp_min(1e-12).unsqueeze(-1)
    return torch.where(used_E.unsqueeze(-1), alpha * (qbar_ED - keys_ED), torch.zeros_like(keys_ED))


def peer_delta(keys_ED: torch.Tensor, peer_sum_ED: torch.Tensor, peer_mass_E: torch.Tensor,
               gamma: float) -> torch.Tensor:
    """``gamma * (pbar_e - k_e)``: ``pbar_e`` is the gate-weighted mean key of e's co-selected experts.

    ``peer_sum_ED`` sums ``g_te' * k_e'`` over every token t that chose e and
    every other expert e' that t chose; ``peer_mass_E`` sums those ``g_te'``.
    """
    return attraction_delta(keys_ED, peer_sum_ED, peer_mass_E, gamma)


def repulsion_delta(keys_ED: torch.Tensor, beta: float) -> torch.Tensor:
    """``beta * mean_{e' != e} max(0, cos(k_e, k_e')) * (k_e - k_e')`` (within each leading index)."""
    E = keys_ED.shape[-2]
    if E < 2:
        return torch.zeros_like(keys_ED)
    unit_ED = F.normalize(keys_ED, dim=-1, eps=1e-12)
    w_EE = mm(unit_ED, unit_ED.transpose(-1, -2)).clamp_min_(0.0)
    w_EE.diagonal(dim1=-2, dim2=-1).zero_()
    # sum_e' w_ee' (k_e - k_e') = (sum_e' w_ee') k_e - (W K)_e
    push_ED = w_EE.sum(-1, keepdim=True) * keys_ED - mm(w_EE, keys_ED)
    return beta * push_ED / (E - 1)


def updated_usage(usage_E: torch.Tensor, counts_E: torch.Tensor, ema_decay: float) -> torch.Tensor:
    """``ema_decay * u + (1 - ema_decay) * n / sum(n)``; unchanged when nothing was routed."""
    total = counts_E.sum(-1, keepdim=True)
    updated_E = ema_decay * usage_E + (1.0 - ema_decay) * counts_E / total.clamp_min(1e-30)
    return torch.where(total > 0, updated_E, usage_E)  # decided on the device: no host read of the total


def dormant_mask(usage_E: torch.Tensor, slots_per_step: float | torch.Tensor, theta: float,
                 theta_percentile: float) -> torch.Tensor:
    """Which experts count as dormant.

    ``theta > 0``: expected routed slots per step below ``theta``, i.e.
    ``u_e * slots_per_step < theta``. Otherwise ``theta_percentile`` p: the
    ``m = floor(p * E)`` experts with the smallest usage, but only those
    strictly below the ``(m+1)``-th smallest (so equal usage, e.g. uniform,
    makes nobody dormant, and ties never pick an arbitrary subset).
    """
    if theta > 0:
        return usage_E * slots_per_step < theta
    m = int(math.floor(theta_percentile * usage_E.shape[-1] + 1e-9))
    if m <= 0:
        return torch.zeros_like(usage_E, dtype=torch.bool)
    threshold = torch.sort(usage_E, dim=-1).values[..., m:m + 1]
    return usage_E < threshold


def decay_delta(keys_ED: torch.Tensor, dormant_E: torch.Tensor, target: torch.Tensor,
                delta: float) -> torch.Tensor:
    """``delta * (target - k_e)`` for dormant experts: ``k <- (1-delta) k + delta * target``.

    ``target`` is one point for every expert (D) or one per expert (E x D).
    """
    move_ED = delta * (target - keys_ED)  # broadcasts a (D,) target over the experts
    return torch.where(dormant_E.unsqueeze(-1), move_ED, torch.zeros_like(keys_ED))


def clip_rows(delta_ED: torch.Tensor, max_norm: float) -> torch.Tensor:
    """Scale each row down to L2 norm ``max_norm`` when longer (``max_norm <= 0`` = no clipping)."""
    if max_norm <= 0:
        return delta_ED
    norms_E1 = delta_ED.norm(dim=-1, keepdim=True)
    return delta_ED * (max_norm / norms_E1.clamp_min(max_norm))


def gate_entropy_TK(gates_TK: torch.Tensor) -> torch.Tensor:
    """Per-token entropy in nats of the kept gates (0 log 0 = 0)."""
    return torch.special.entr(gates_TK).sum(-1)


def gate_entropy_sum(gates_TK: torch.Tensor, weight_T: torch.Tensor | None = None) -> torch.Tensor:
    """Summed entropy (nats) of the tokens' kept gates, each token weighted by ``weight_T`` (1: every token).
    Two ops: ``entr`` and one reduction (three with weights)."""
    entr_TK = torch.special.entr(gates_TK)
    return entr_TK.sum() if weight_T is None else (entr_TK.sum(-1) * weight_T).sum()
