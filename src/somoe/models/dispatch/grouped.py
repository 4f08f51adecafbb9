"""Grouped expert MLPs (GELU/ReLU with biases, SwiGLU) as autograd functions over host counts (the
expert loop) or device groups (one grouped matmul per op), and the choice of path per call."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .. import dispatch as tuning
from .activation import _activation_grad
from .expert_loop import (_affine_into, _bucket, _expert_loop_backward, _expert_loop_forward, _rows, _slices,
                          _with_slack, _zero_padded)
from .lora import LoRA, _lora_mlp
from .padded import PaddedLayout, padded_frozen_mlp, padded_layout
from .plan import Counts, Groups, _device_counts, _groups, compute_dtype, grouped_mm, host_counts


def _gmm(a_SK: torch.Tensor, b_EKN: torch.Tensor, counts: Counts, bias_EN: torch.Tensor | None = None) -> torch.Tensor:
    """Row block ``e`` of ``a`` times ``b[e]`` (+ ``bias[e]``), one output buffer, no concatenation."""
    if _device_counts(counts):
        groups = _groups(counts, a_SK.shape[0])
        out = grouped_mm(a_SK, b_EKN, groups.offsets)
        if bias_EN is not None:
            out += bias_EN.index_select(0, groups.expert_S)
        return out
    out = _with_slack(a_SK, b_EKN.shape[2])
    for e, s, t in _slices(counts):
        a = _rows(a_SK, s, _bucket(t - s, a_SK))  # rows past t: the next expert's, overwritten by it
        _affine_into(out[s:s + a.shape[0]], a, b_EKN[e], bias_EN, e)
    return out[:a_SK.shape[0]]


def _gmm_weight_grad(a_SK: torch.Tensor, d_SN: torch.Tensor, counts: Counts) -> torch.Tensor:
    """``a[e-block]^T @ d[e-block]`` for every expert: (E, K, N), zeros for empty experts."""
    if _device_counts(counts):
        return grouped_mm(a_SK.t(), d_SN, _groups(counts, a_SK.shape[0]).offsets)
    out = a_SK.new_zeros(len(counts), a_SK.shape[1], d_SN.shape[1])
    for e, s, t in _slices(counts):
        n = _bucket(t - s, a_SK)  # the rows past t meet zero rows of d: exact
        torch.mm(_rows(a_SK, s, n).t(), _zero_padded(d_SN[s:t], n), out=out[e])
    return out


def _group_sum(d_SN: torch.Tensor, counts: Counts) -> torch.Tensor:
    """Per-expert sum of rows (the bias gradient): (E, N), in fp32 whatever ``d``'s dtype.

    An expert's bias gradient sums thousands of rows; CUDA's ``index_add_`` into a bf16 buffer adds
    them one by one in bf16 (8 significant bits: past 256 rows of ones the sum stops growing), so the
    rows are added into fp32 and the result is handed back in fp32 (autograd casts it to the bias's
    dtype)."""
    acc = torch.float64 if d_SN.dtype == torch.float64 else torch.float32
    if _device_counts(counts):
        groups = _groups(counts, d_SN.shape[0])
        return d_SN.new_zeros(groups.num_experts, d_SN.shape[1], dtype=acc).index_add_(
            0, groups.expert_S, d_SN.to(acc))
    out = d_SN.new_zeros(len(counts), d_SN.shape[1], dtype=acc)
    for e, s, t in _slices(counts):
        torch.sum(d_SN[s:t], 0, dtype=acc, out=out[e])
    return out

def _grad_or_none(needed: bool, fn: Callable[[], torch.Tensor]) -> torch.Tensor | None:
    return fn() if needed else None

class _GroupedMLP(torch.autograd.Function):
    """``g_S * (act(x W1_e + b1_e) W2_e + b2_e)``; backward computes only the gradients autograd needs.

    With host counts (CPU) each expert's three ops (two matmuls and the activation, and in
    backward two matmuls and the activation's gradient) run back to back on its slice while it
    is in cache; everything elementwise over all slots (the gates, their gradient) is one op on
    the whole buffer, not one per expert (``gates_S``; None: ungated). With device counts (GPU)
    each op is one grouped call over all experts and ``gates_S`` is None.
    """

    @staticmethod
    def forward(ctx, x_SD, counts, activation, gates_S, w1_EDF, b1_EF, w2_EFD, b2_ED):
        # Weights arrive in their storage dtype and are cast to x's dtype here (per expert on CPU):
        # a cast copy saved for backward would duplicate fp32-stored frozen experts under autocast.
        dt = x_SD.dtype
        if _device_counts(counts):
            counts = _groups(counts, x_SD.shape[0])
            pres = [_gmm(x_SD, w1_EDF.to(dt), counts, _cast(b1_EF, dt))]
            u_SD = _gmm(activation(pres[0]), w2_EFD.to(dt), counts, _cast(b2_ED, dt))
        else:
            u_SD, pres = _expert_loop_forward(x_SD, counts, activation, w1_EDF, b1_EF, w2_EFD, b2_ED)
        y_SD = u_SD if gates_S is None else u_SD * gates_S.unsqueeze(1)
        weight_grads = any(ctx.needs_input_grad[4:])
        # the ungated output u is kept for the gates' gradient
        ctx.save_for_backward(x_SD if weight_grads else None, gates_S, u_SD if gates_S is not None else None,
                              w1_EDF, w2_EFD, *pres)
        ctx.counts, ctx.activation, ctx.dt = counts, activation, dt
        ctx.has_b1, ctx.has_b2 = b1_EF is not None, b2_ED is not None
        return y_SD

    @staticmethod
    def backward(ctx, dy_SD):
        x_SD, gates_S, u_SD, w1_EDF, w2_EFD, *pres = ctx.saved_tensors
        counts, act, need = ctx.counts, ctx.activation, ctx.needs_input_grad
        dy_SD = dy_SD.to(ctx.dt).contiguous()
        dg = (dy_SD * u_SD).sum(1) if gates_S is not None and need[3] else None
        if not _device_counts(counts):
            dx, (dw1, db1, dw2, db2) = _expert_loop_backward(ctx, dy_SD, x_SD, pres, gates_S, w1_EDF, w2_EFD)
            return dx, None, None, dg, dw1, db1, dw2, db2
        if gates_S is not None:
            dy_SD = dy_SD * gates_S.unsqueeze(1)
        # gradients come back in the compute dtype; autograd casts them to the weights' dtype
        pre_SF, w1_EDF, w2_EFD = pres[0], w1_EDF.to(ctx.dt), w2_EFD.to(ctx.dt)
        d_act = _gmm(dy_SD, w2_EFD.transpose(1, 2), counts)
        dw2 = _grad_or_none(need[6], lambda: _gmm_weight_grad(act(pre_SF), dy_SD, counts))
        db2 = _grad_or_none(need[7] and ctx.has_b2, lambda: _group_sum(dy_SD, counts))
        d_pre = _activation_grad(act, pre_SF, d_act)
        del d_act
        dx = _grad_or_none(need[0], lambda: _gmm(d_pre, w1_EDF.transpose(1, 2), counts))
        dw1 = _grad_or_none(need[4], lambda: _gmm_weight_grad(x_SD, d_pre, counts))
        db1 = _grad_or_none(need[5] and ctx.has_b1, lambda: _group_sum(d_pre, counts))
        return dx, None, None, dg, dw1, db1, dw2, db2

class _GroupedSwiGLU(torch.autograd.Function):
    """``(silu(x Wg_e) * x W1_e) W2_e`` (no biases, the smollm MoE)."""

    @staticmethod
    def forward(ctx, x_SD, counts, wg_EDF, w1_EDF, w2_EFD):
        g_SF, u_SF = _gmm(x_SD, wg_EDF, counts), _gmm(x_SD, w1_EDF, counts)
        y_SD = _gmm(F.silu(g_SF) * u_SF, w2_EFD, counts)
        ctx.save_for_backward(x_SD, g_SF, u_SF, wg_EDF, w1_EDF, w2_EFD)
        ctx.counts = counts
        return y_SD

    @staticmethod
    def backward(ctx, dy_SD):
        x_SD, g_SF, u_SF, wg_EDF, w1_EDF, w2_EFD = ctx.saved_tensors
        counts, need = ctx.counts, ctx.needs_input_grad
        dy_SD = dy_SD.to(g_SF.dtype).contiguous()
        d_h = _gmm(dy_SD, w2_EFD.transpose(1, 2), counts)
        silu_g = F.silu(g_SF)
        dw2 = _grad_or_none(need[4], lambda: _gmm_weight_grad(silu_g * u_SF, dy_SD, counts))
        d_u = d_h * silu_g
        d_g = torch.ops.aten.silu_backward(d_h * u_SF, g_SF)
        dx = None
        if need[0]:
            dx = _gmm(d_g, wg_EDF.transpose(1, 2), counts)
            dx += _gmm(d_u, w1_EDF.transpose(1, 2), counts)
        dwg = _grad_or_none(need[2], lambda: _gmm_weight_grad(x_SD, d_g, counts))
        dw1 = _grad_or_none(need[3], lambda: _gmm_weight_grad(x_SD, d_u, counts))
        return dx, None, dwg, dw1, dw2

def _aligned_or_host(counts: Counts, x_SD: torch.Tensor, d_ffn: int) -> Counts:
    """Device counts only where the grouped kernel takes the shapes (CUDA's and the CPU's): every row
    stride a multiple of 16 bytes (d_model and d_ffn multiples of 8 in bf16, of 4 in fp32). Other
    shapes fall back to the per-expert loop, at the price of one host sync (no real model has such
    widths)."""
    if _device_counts(counts) and (x_SD.shape[1] * x_SD.element_size() % 16 or d_ffn * x_SD.element_size() % 16):
        return host_counts(counts)
    return counts


def _cast(t: torch.Tensor | None, dt: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dt)


def grouped_mlp(x_SD: torch.Tensor, counts: Counts, w1_EDF: torch.Tensor, b1_EF: torch.Tensor | None,
                w2_EFD: torch.Tensor, b2_ED: torch.Tensor | None, lora: LoRA | None = None,
                activation: Callable[[torch.Tensor], torch.Tensor] = F.gelu) -> torch.Tensor:
    """``act(x W1_e + b1_e) W2_e + b2_e`` on each expert's contiguous slice of ``x_SD``.

    Computes in the weights' dtype (bf16 storage means bf16 compute), or in
    the autocast dtype inside autocast, and returns that dtype; :func:`dispatch`
    casts back. Weights are cast one expert at a time inside the autograd
    function and never saved cast (fp32-stored frozen experts are not
    duplicated in bf16 for backward). Frozen weights get no gradient work.
    """
    dt = compute_dtype(x_SD, w1_EDF.dtype)
    x_SD = x_SD.to(dt)
    if lora is not None and _device_counts(counts):
        # device path: the adapters merged into per-expert weights (two bmm), which then get gradients
        # from the grouped backward like trainable experts; no host count list
        w1_EDF = w1_EDF.to(dt) + lora.scale * torch.bmm(lora.a1_EDR.to(dt), lora.b1_ERF.to(dt))
        w2_EFD = w2_EFD.to(dt) + lora.scale * torch.bmm(lora.a2_EFR.to(dt), lora.b2_ERD.to(dt))
        lora = None
    if lora is not None:
        w1_EDF, w2_EFD, b1_EF, b2_ED = (_cast(t, dt) for t in (w1_EDF, w2_EFD, b1_EF, b2_ED))
        return _lora_mlp(x_SD, host_counts(counts), w1_EDF, b1_EF, w2_EFD, b2_ED, lora, activation, dt)
    counts = _aligned_or_host(counts, x_SD, w1_EDF.shape[2])
    gates_S = None
    if isinstance(counts, Groups) and counts.gates_S is not None:  # fold the gates in (see Groups)
        gates_S, counts.gates_applied = counts.gates_S.to(dt), True
    # the Functions' ops run on tensors already in dt; autocast must not re-cast them
    with torch.autocast(x_SD.device.type, enabled=False):
        layout = _padded_layout_if_faster(x_SD, counts, dt, (w1_EDF, b1_EF, w2_EFD, b2_ED))
        if layout is not None:
            return padded_frozen_mlp(x_SD, layout, w1_EDF, b1_EF, w2_EFD, b2_ED, activation, gates_S)
        return _GroupedMLP.apply(x_SD.contiguous(), counts, activation, gates_S, w1_EDF, b1_EF, w2_EFD, b2_ED)


def _padded_layout_if_faster(x_SD: torch.Tensor, counts: Counts, dt: torch.dtype, weights) -> PaddedLayout | None:
    """The padded path's layout where it wins: on CPU, frozen weights, rows within PADDED_MAX_WASTE; in
    bf16, or in fp32 for small experts (FP32_PADDED_MAX_EXPERT_ELEMENTS)."""
    if x_SD.device.type != "cpu" or _device_counts(counts):
        return None
    small = weights[0].shape[1] * weights[0].shape[2] <= tuning.FP32_PADDED_MAX_EXPERT_ELEMENTS
    if not (dt == torch.bfloat16 or (dt == torch.float32 and small)):
        return None
    if any(w is not None and w.requires_grad for w in weights):
        return None
    layout = padded_layout(counts, x_SD.device)
    loop_rows = sum(_bucket(n, x_SD) for n in counts)
    return layout if 0 < layout.rows <= tuning.PADDED_MAX_WASTE * loop_rows else None


def grouped_swiglu(x_SD: torch.Tensor, counts: Counts, wg_EDF: torch.Tensor, w1_EDF: torch.Tensor,
                   w2_EFD: torch.Tensor) -> torch.Tensor:
    """``(silu(x Wg_e) * (x W1_e)) W2_e`` per expert slice; dtype rules as :func:`grouped_mlp`."""
    dt = compute_dtype(x_SD, w1_EDF.dtype)
    counts = _aligned_or_host(counts, x_SD, w1_EDF.shape[2])
    x_SD, wg_EDF, w1_EDF, w2_EFD = (t.to(dt) for t in (x_SD, wg_EDF, w1_EDF, w2_EFD))
    with torch.autocast(x_SD.device.type, enabled=False):
        return _GroupedSwiGLU.apply(x_SD.contiguous(), counts, wg_EDF, w1_EDF, w2_EFD)
