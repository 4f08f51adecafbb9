"""Product-key routing for the SoME layer (``model.some.router: product``; docs/some-layer.md).

``N = n^2`` experts; expert ``e = i * n + j`` is the pair of sub-key ``i`` of a head's first codebook and
sub-key ``j`` of its second. Each of the ``H`` heads splits its slice of the query into halves ``a, b``
(``d_k`` each), scores them against its two codebooks (``n x d_k`` each), keeps the ``k`` best sub-keys
per half and then the ``k`` best of the ``k x k`` sums: exactly the top-``k`` over all ``N`` composed
keys (if ``(i, j)`` is among the best sums, ``i`` is among the ``k`` best rows, else ``k`` better rows
pair with ``j``). Cost per token ``O(H (n d_k + k^2))`` instead of ``O(N d)``.

Codebooks are stacked as ``G = 2H`` key sets ``(G, n, d_k)``, codebook ``g = 2h + half``; the layer's
rules (``some_rules``) act on each independently. The functions here are pure, so tests compare them
with exhaustive scoring of the ``N`` composed keys; :class:`ProductRouting` is the layer's forward
through them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import fp32_matmul
from ..fp32_matmul import mm
from .base import in_recompute


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


class ProductRouting:
    """Mixed into :class:`~somoe.models.ffn.some.SoMELayer` (``router: product``): the forward through
    sub-key pairs and the statistics per sub-key. The layer provides the query net, the key store
    ``(G, n, d_k)``, the experts (``_run_experts``), the tallies and the key rules."""

    def _forward_product(self, x_BTD: torch.Tensor, valid_BT: torch.Tensor | None
                         ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Each head's top-k pairs of sub-keys; the ``H k`` slots of a token share one expert pool."""
        c = self.cfg
        x_TD = x_BTD.reshape(-1, self.d_model)
        T, n = x_TD.shape[0], c.subkeys_per_codebook
        weight_T = None if valid_BT is None else valid_BT.reshape(-1).to(torch.float32)
        q_TQ, q_raw_TQ, i_THk, j_THk, logits_THk = self._route_product(x_TD, weight_T)
        gates_THk = torch.softmax(logits_THk.float() / self.temperature(), dim=-1)
        expert_THk = i_THk * n + j_THk
        y_TD = self._run_experts(x_TD, expert_THk.view(T, -1), gates_THk.view(T, -1))
        if self.out_scale is not None:
            y_TD = y_TD * self.out_scale.to(y_TD.dtype)
        if not in_recompute():  # a checkpoint recompute has been counted by the first forward
            with torch.no_grad():
                g32_THk = gates_THk.detach().float()
                # per token, the mean over heads of each head's gate entropy (the band's ln(k) bound holds)
                entropy_T = torch.special.entr(g32_THk).sum(-1).mean(-1)
                entropy = entropy_T.sum() if weight_T is None else entropy_T @ weight_T
                tokens = T if weight_T is None else weight_T.sum()
                rows_TH2k = codebook_rows(i_THk, j_THk, n)
                self._tally.add_slots(expert_THk, rows_TH2k, weight_T, entropy, tokens)
                if self.training:  # O(slots): PAD positions route too, and count as routed
                    for seen in (self.routed_ever, self.routed_since_eval):
                        seen.index_fill_(0, expert_THk.reshape(-1), True)
                if self._gathering():
                    self._accumulate_product(q_TQ, q_raw_TQ, rows_TH2k, g32_THk, weight_T, entropy)
        return y_TD.view_as(x_BTD), None

    def _route_product(self, x_TD: torch.Tensor, weight_T: torch.Tensor | None):
        """(query the scores used, raw query, i, j, selected scores over no temperature), in fp32 unless
        ``router_dtype: autocast`` (as :meth:`_scores`)."""
        if self.cfg.router_dtype == "autocast":
            return self._product_router(x_TD, weight_T)
        with torch.autocast(x_TD.device.type, enabled=False):
            return self._product_router(x_TD.to(next(self.query.parameters()).dtype), weight_T)

    def _product_router(self, x_TD: torch.Tensor, weight_T: torch.Tensor | None):
        c = self.cfg
        q_raw_TQ = q_TQ = fp32_matmul.apply(self.query, x_TD)  # fp32 stays fp32 where TF32 is on
        if c.center_queries:
            q_TQ = q_TQ - self.query_center.to(q_TQ.dtype)
        if self.query_norm is not None:
            q_TQ = self.query_norm(q_TQ, weight_T, update=not in_recompute())
        keys_Gnd = self.routing_keys().to(q_TQ.dtype)
        q_TGd = q_TQ.view(q_TQ.shape[0], keys_Gnd.shape[0], keys_Gnd.shape[-1])
        cosine = c.cosine_scores
        with torch.no_grad():  # the full table only selects; the gates' scores are recomputed below
            table_TGn = subkey_scores(q_TGd.detach(), keys_Gnd, cosine)
            bias_Gn = self.selection_bias if c.selection_bias_rate > 0 else None
            i_THk, j_THk, _ = product_topk(table_TGn, c.top_k, bias_Gn)
        logits_THk = selected_scores(q_TGd, keys_Gnd, i_THk, j_THk, cosine)
        q_used_TQ = F.normalize(q_TGd, dim=-1).flatten(1) if cosine else q_TQ
        return q_used_TQ, q_raw_TQ, i_THk, j_THk, logits_THk

    @torch.no_grad()
    def _accumulate_product(self, q_TQ: torch.Tensor, q_raw_TQ: torch.Tensor, rows_TH2k: torch.Tensor,
                            g_THk: torch.Tensor, weight_T: torch.Tensor | None, entropy: torch.Tensor) -> None:
        """Per sub-key (spec: product keys, section 2): the gate-weighted sum of its query halves, its gate
        mass and its slot count, over every slot whose expert lies in its row (or column)."""
        with torch.autocast(q_TQ.device.type, enabled=False):
            q_TQ, q_raw_TQ = q_TQ.detach().float(), q_raw_TQ.detach().float()
            if self.cfg.update_token_fraction < 1.0:
                sample = self._token_sample(q_TQ.shape[0], q_TQ.device)
                q_TQ, q_raw_TQ, rows_TH2k, g_THk = q_TQ[sample], q_raw_TQ[sample], rows_TH2k[sample], g_THk[sample]
                weight_T = None if weight_T is None else weight_T[sample]
                entropy = None
            T, H, _, k = rows_TH2k.shape
            d = self.key_store.shape[-1]
            count_TH2k = rows_TH2k.new_ones(rows_TH2k.shape, dtype=torch.float32)
            if weight_T is not None:  # PAD tokens: zero gates and zero counts
                g_THk = g_THk * weight_T.view(T, 1, 1)
                count_TH2k = count_TH2k * weight_T.view(T, 1, 1, 1)
            g_TH2k = g_THk.unsqueeze(2).expand(T, H, 2, k)
            rows_S = rows_TH2k.reshape(-1)
            halves_TH2d = q_TQ.view(T, H, 2, d)
            self.stat_q_sum.view(-1, d).index_add_(0, rows_S, (g_TH2k.unsqueeze(-1) * halves_TH2d.unsqueeze(3)
                                                               ).reshape(-1, d))
            self.stat_gate.view(-1).index_add_(0, rows_S, g_TH2k.reshape(-1))
            self.stat_count.view(-1).index_add_(0, rows_S, count_TH2k.reshape(-1))
            self.stat_q_total += q_TQ.sum(0) if weight_T is None else weight_T @ q_TQ
            if self.cfg.decay and self.cfg.decay_target == "sample":
                self._draw_query_samples(q_TQ, weight_T)
            if self.cfg.center_queries:
                self.stat_q_raw_total += q_raw_TQ.sum(0) if weight_T is None else weight_T @ q_raw_TQ
            self.stat_tokens += T if weight_T is None else weight_T.sum()
            if entropy is None:
                entropy = torch.special.entr(g_THk).sum(-1).mean(-1).sum()
            self.stat_gate_entropy += entropy

    def _queries_at(self, q_TD: torch.Tensor, rows_R: torch.Tensor) -> torch.Tensor:
        """The query (or, per codebook, the query half) of token ``rows_R[r]`` for every key row ``r``."""
        if not self.product:
            return q_TD[rows_R]
        G, d = self.key_store.shape[0], self.key_store.shape[-1]
        book_G1 = torch.arange(G, device=q_TD.device).unsqueeze(1)
        return q_TD.view(q_TD.shape[0], G, d)[rows_R, book_G1]

