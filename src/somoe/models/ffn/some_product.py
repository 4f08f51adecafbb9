"""Product-key routing for the SoME layer (``model.some.router: product``; docs/some-layer.md).

``N = n^2`` experts; expert ``e = i * n + j`` is the pair of sub-key ``i`` of a head's first codebook and
sub-key ``j`` of its second. Each of the ``H`` heads splits its slice of the query into halves ``a, b``
(``d_k`` each), scores them against its two codebooks (``n x d_k`` each), keeps the ``k`` best sub-keys
per half and then the ``k`` best of the ``k x k`` sums: exactly the top-``k`` over all ``N`` composed
keys (if ``(i, j)`` is among the best sums, ``i`` is among the ``k`` best rows, else ``k`` better rows
pair with ``j``). Cost per token ``O(H (n d_k + k^2))`` instead of ``O(N d)``.

Codebooks are stacked as ``G = 2H`` key sets ``(G, n, d_k)``, codebook ``g = 2h + half``; the layer's
rules (``some_rules``) act on each independently. The functions here are pure, so tests compare them
with exhaustive scoring of the ``N`` composed keys.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..fp32_matmul import mm


def subkey_scores(q_TGd: torch.Tensor, keys_Gnd: torch.Tensor, cosine: bool) -> torch.Tensor:
    """Scores of every query half against its codebook ``(T, G, n)``: per-half cosine, or dot / sqrt(d_k).
    In true fp32 where TF32 is on (``fp32_matmul``): near-ties must not flip the selection."""
    if cosine:
        q_TGd, keys_Gnd = F.normalize(q_TGd, dim=-1), F.normalize(keys_Gnd, dim=-1)
    scores_GTn = mm(q_TGd.transpose(0, 1), keys_Gnd.transpose(1, 2))
    scores_TGn = scores_GTn.transpose(0, 1)
    return scores_TGn if cosine else scores_TGn / math.sqrt(q_TGd.shape[-1])


def product_topk(scores_TGn: torch.Tensor, k: int, bias_Gn: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``k`` best experts of each head, by ``s1[i] + s2[j]`` (plus the selection bias, if any).

    Returns ``(i_THk, j_THk, scores_THk)``: sub-key indices in the head's two codebooks and the
    unbiased composed scores, best first. Static shapes (``k`` and ``k^2`` candidates), no host sync.
    """
    T, G, n = scores_TGn.shape
    select_TGn = scores_TGn if bias_Gn is None else scores_TGn + bias_Gn
    _, top_TGk = select_TGn.topk(k, dim=-1)
    sel_TH2k = select_TGn.gather(-1, top_TGk).view(T, G // 2, 2, k)
    cand_THkk = sel_TH2k[:, :, 0, :, None] + sel_TH2k[:, :, 1, None, :]
    _, flat_THk = cand_THkk.flatten(2).topk(k, dim=-1)
    top_TH2k = top_TGk.view(T, G // 2, 2, k)
    i_THk = top_TH2k[:, :, 0].gather(-1, torch.div(flat_THk, k, rounding_mode="floor"))
    j_THk = top_TH2k[:, :, 1].gather(-1, flat_THk % k)
    raw_TH2n = scores_TGn.view(T, G // 2, 2, n)
    scores_THk = raw_TH2n[:, :, 0].gather(-1, i_THk) + raw_TH2n[:, :, 1].gather(-1, j_THk)
    return i_THk, j_THk, scores_THk


def selected_scores(q_TGd: torch.Tensor, keys_Gnd: torch.Tensor, i_THk: torch.Tensor, j_THk: torch.Tensor,
                    cosine: bool) -> torch.Tensor:
    """The composed scores of the selected pairs, differentiable in the query (``T, H, k``).

    Only ``H k`` sub-key pairs per token carry a gradient, so the backward is ``O(T H k d_k)``; the
    full ``T x G x n`` table is scored without autograd.
    """
    T, G, d = q_TGd.shape
    H = G // 2
    if cosine:
        q_TGd, keys_Gnd = F.normalize(q_TGd, dim=-1), F.normalize(keys_Gnd, dim=-1)
    keys_H2nd = keys_Gnd.view(H, 2, -1, d)
    head_H1 = torch.arange(H, device=q_TGd.device).view(1, H, 1)
    k1_THkd, k2_THkd = keys_H2nd[:, 0][head_H1, i_THk], keys_H2nd[:, 1][head_H1, j_THk]
    q_TH2d = q_TGd.view(T, H, 2, d)
    s_THk = (k1_THkd * q_TH2d[:, :, 0, None]).sum(-1) + (k2_THkd * q_TH2d[:, :, 1, None]).sum(-1)
    return s_THk if cosine else s_THk / math.sqrt(d)


def codebook_rows(i_THk: torch.Tensor, j_THk: torch.Tensor, n: int) -> torch.Tensor:
    """Flat row of each slot's two sub-keys in the stacked ``(G * n)`` codebooks: ``(T, H, 2, k)``."""
    H = i_THk.shape[1]
    base_H = torch.arange(H, device=i_THk.device).view(1, H, 1) * (2 * n)
    return torch.stack([base_H + i_THk, base_H + n + j_THk], dim=2)


def load_balance_step(bias_Gn: torch.Tensor, load_Gn: torch.Tensor, rate: float | torch.Tensor) -> torch.Tensor:
    """Loss-free balancing: ``b + rate * sign(mean load - load)`` per sub-key, within each codebook."""
    return bias_Gn + rate * torch.sign(load_Gn.mean(-1, keepdim=True) - load_Gn)


class MaskedBatchNorm(nn.Module):
    """BatchNorm over the query's features whose batch statistics skip PAD positions (``weight_T`` 0).

    Training normalises with the counted tokens' mean and (biased) variance and moves the running
    statistics by ``momentum``; eval uses the running statistics. A batch with no counted token leaves
    them as they were.
    """

    def __init__(self, features: int, momentum: float = 0.1, eps: float = 1e-5):
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.weight = nn.Parameter(torch.ones(features))
        self.bias = nn.Parameter(torch.zeros(features))
        self.register_buffer("running_mean", torch.zeros(features))
        self.register_buffer("running_var", torch.ones(features))

    def forward(self, q_TQ: torch.Tensor, weight_T: torch.Tensor | None = None, update: bool = True) -> torch.Tensor:
        if not self.training:
            mean, var = self.running_mean, self.running_var
        else:
            w_T1 = q_TQ.new_ones(q_TQ.shape[0], 1) if weight_T is None else weight_T.to(q_TQ.dtype).unsqueeze(1)
            count = w_T1.sum().clamp_min(1.0)
            mean = (w_T1 * q_TQ).sum(0) / count
            var = (w_T1 * (q_TQ - mean) ** 2).sum(0) / count
            if update:
                with torch.no_grad():
                    m, seen = self.momentum, w_T1.sum() > 0
                    unbiased = var.detach() * count / (count - 1).clamp_min(1.0)
                    self.running_mean.copy_(torch.where(seen, (1 - m) * self.running_mean + m * mean.detach(),
                                                        self.running_mean))
                    self.running_var.copy_(torch.where(seen, (1 - m) * self.running_var + m * unbiased,
                                                       self.running_var))
        return (q_TQ - mean) * torch.rsqrt(var + self.eps) * self.weight + self.bias
