"""The SoME layer's cosine router as one autograd function (spec section 2: ``s = cos(q, K) / tau``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..fp32_matmul import mm


class _CosineScores(torch.autograd.Function):
    """``normalize(q) @ normalize(keys).T / tau`` and the unit queries, with a hand-written backward.

    Autograd through ``F.normalize`` and the division issues ~17 ops for the query's gradient; here it
    is one matmul and five elementwise ops: with ``g = ds @ (k_hat / tau)``, the gradient of the unit
    query ``q / |q|`` is ``(g - q_hat (g . q_hat)) / |q|``. The keys get no gradient (they move by the
    rules); a learnable ``tau`` (a tensor) gets ``-sum(ds * s) / tau``.
    """

    @staticmethod
    def forward(ctx, q_TD, keys_ED, tau):
        norm_T1 = torch.linalg.vector_norm(q_TD, dim=-1, keepdim=True).clamp_min(1e-12)  # F.normalize's eps
        q_hat_TD = q_TD / norm_T1
        k_scaled_ED = F.normalize(keys_ED, dim=-1).to(q_TD.dtype)
        if isinstance(tau, torch.Tensor) or tau != 1.0:
            k_scaled_ED = k_scaled_ED / tau  # the small E x D side takes 1/tau
        scores_TE = mm(q_hat_TD, k_scaled_ED.t())  # true fp32 where cuBLAS would use TF32
        tau_tensor = isinstance(tau, torch.Tensor)
        ctx.save_for_backward(q_hat_TD, norm_T1, k_scaled_ED, scores_TE if tau_tensor else None,
                              tau if tau_tensor else None)
        ctx.mark_non_differentiable(q_hat_TD)
        ctx.set_materialize_grads(False)  # no zero-filled gradient for the unit queries
        return scores_TE, q_hat_TD

    @staticmethod
    def backward(ctx, d_scores_TE, _d_q_hat):
        q_hat_TD, norm_T1, k_scaled_ED, scores_TE, tau = ctx.saved_tensors
        dq = d_tau = None
        if d_scores_TE is None:
            return None, None, None
        if ctx.needs_input_grad[0]:
            g_TD = d_scores_TE @ k_scaled_ED
            dq = (g_TD - q_hat_TD * (g_TD * q_hat_TD).sum(-1, keepdim=True)) / norm_T1
        if tau is not None and ctx.needs_input_grad[2]:
            d_tau = -(d_scores_TE * scores_TE).sum() / tau
        return dq, None, d_tau


def cosine_scores(q_TD: torch.Tensor, keys_ED: torch.Tensor, tau: torch.Tensor | float):
    """(scores over tau, unit queries): :class:`_CosineScores`."""
    return _CosineScores.apply(q_TD, keys_ED, tau)
