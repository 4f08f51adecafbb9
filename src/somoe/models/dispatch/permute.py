"""The dispatch itself: slots sorted by expert, the experts run on the sorted rows, each slot's
output gated and the K slots of a token summed back in token order (:class:`_GatedUnpermute`, :class:`_Unpermute`)."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from .plan import DeviceGroups, GroupedFn, Groups, grouped_mm_available, plan


_STATIC = False  # static_dispatch(): device-side groups on every device (the GPU path, on the CPU too)


@contextlib.contextmanager
def static_dispatch(on: bool = True) -> Iterator[None]:
    """Route every :func:`dispatch` inside through device-side groups (no host count list, fixed
    ``T*K``-row buffers): what the GPU runs, and what ``torch.compile`` traces without a graph break.
    On the CPU the grouped matmul is correct but slower than the per-expert loop."""
    global _STATIC
    previous, _STATIC = _STATIC, on
    try:
        yield
    finally:
        _STATIC = previous


def dispatch(x_TD: torch.Tensor, expert_idx_TK: torch.Tensor, gates_TK: torch.Tensor,
             expert_fn: GroupedFn, num_experts: int, compute_dtype: torch.dtype | None = None,
             grouped: bool | None = None, counts_E: torch.Tensor | None = None) -> torch.Tensor:
    """``y_t = sum_j gates_tj * Expert_{idx_tj}(x_t)`` for every token, dropless.

    ``expert_fn(x_SD, counts)`` receives the token copies sorted by expert
    (``counts[e]`` consecutive rows for expert ``e``) and returns their outputs
    in the same order (see :func:`grouped_mlp`, :func:`per_expert`). With
    ``compute_dtype`` the T tokens are cast before being copied K times.
    ``grouped`` forces (True) or forbids (False) device-tensor counts; by
    default :func:`grouped_mm_available` decides.
    """
    dt = compute_dtype or x_TD.dtype
    if grouped is None:
        grouped = _STATIC or grouped_mm_available(x_TD.device, dt)
    if torch.compiler.is_compiling():
        # traced whole on device groups (no host value, fixed T*K-row shapes), in every dtype (fp32 through
        # plan.grouped_mm's opaque op). Compiled with inductor this path once gave wrong gradients on an
        # H100 (torch 2.11: a seed000_some step's gradients 85% off eager's while the loss matched);
        # tests/train/test_step_equivalence.py compares every parameter's gradient on every GPU run
        grouped = True
    return _dispatch(x_TD, expert_idx_TK, gates_TK, expert_fn, num_experts, dt, grouped, counts_E)


def _dispatch(x_TD, expert_idx_TK, gates_TK, expert_fn, num_experts, dt, grouped: bool,
              counts_E: torch.Tensor | None) -> torch.Tensor:
    K = expert_idx_TK.shape[1]
    p = plan(expert_idx_TK, num_experts, host_counts=not grouped, counts_E=counts_E)
    inverse_S = torch.empty_like(p.order_S)
    inverse_S[p.order_S] = torch.arange(p.order_S.numel(), device=p.order_S.device)
    acc = torch.float64 if x_TD.dtype == torch.float64 else torch.float32  # fp32 sums for bf16/fp16 slots
    # the K-fold copy (matmul operands must be contiguous), whose backward sums each token's K pieces in acc
    x_SD = _Replicate.apply(x_TD, dt, p.token_S, inverse_S, K, acc)
    if grouped:
        # device groups: offsets once per layer, shared by the forward's and backward's grouped matmuls
        y_SD = expert_fn(x_SD, DeviceGroups(torch.cumsum(p.counts, 0, dtype=torch.int32), p.expert_S))
        return _GatedUnpermute.apply(y_SD, gates_TK, inverse_S, p.order_S, acc).to(x_TD.dtype)
    g_S = gates_TK.reshape(-1).index_select(0, p.order_S)
    counts = Groups(p.counts, g_S)
    y_SD = expert_fn(x_SD, counts)
    if not counts.gates_applied:
        y_SD = y_SD * g_S.to(y_SD.dtype).unsqueeze(1)
    return _Unpermute.apply(y_SD, inverse_S, p.token_S, K, acc).to(x_TD.dtype)


class _GatedUnpermute(torch.autograd.Function):
    """``y_t = sum_j g_tj * u_{slot(t, j)}`` as one batched (1 x K) @ (K x D) product per token, in ``acc``.

    The device path's gate-and-sum: the slots' ungated outputs are gathered into token order once,
    and the gates' gradient is the same product transposed, so neither the gates nor their gradient
    pass through the sorted order (a gather forward, a zero-filled scatter-add backward)."""

    @staticmethod
    def forward(ctx, u_SD, gates_TK, inverse_S, order_S, acc):
        T, K = gates_TK.shape
        u_TKD = u_SD.index_select(0, inverse_S).view(T, K, u_SD.shape[1]).to(acc)
        g_T1K = gates_TK.to(acc).unsqueeze(1)
        ctx.save_for_backward(u_TKD, g_T1K, order_S)
        ctx.u_dtype, ctx.g_dtype = u_SD.dtype, gates_TK.dtype
        return torch.bmm(g_T1K, u_TKD).squeeze(1)

    @staticmethod
    def backward(ctx, d_TD):
        u_TKD, g_T1K, order_S = ctx.saved_tensors
        d_TD = d_TD.to(u_TKD.dtype)
        du_SD = du = dg = None
        if ctx.needs_input_grad[0]:
            du = g_T1K.transpose(1, 2) * d_TD.unsqueeze(1)  # (T, K, D): each slot's share
            du_SD = du.view(-1, d_TD.shape[1]).index_select(0, order_S).to(ctx.u_dtype)
        if ctx.needs_input_grad[1]:
            dg = torch.bmm(u_TKD, d_TD.unsqueeze(2)).squeeze(2).to(ctx.g_dtype)
        return du_SD, dg, None, None, None


def _sum_slots(y_SD: torch.Tensor, inverse_S: torch.Tensor, K: int, acc: torch.dtype) -> torch.Tensor:
    """``out_t = sum_j y_{slot(t, j)}`` in ``acc``: the sorted rows gathered back into token order (each
    token's K slots adjacent) and reduced, never added into a buffer of ``y``'s dtype."""
    y_TKD = y_SD.index_select(0, inverse_S).view(-1, K, y_SD.shape[1])
    if y_SD.dtype == acc or y_SD.is_cuda:  # one reduction kernel
        return y_TKD.sum(1, dtype=acc)
    # K adds into one accumulator: ``sum(1, dtype=acc)`` first casts the whole T x K x D block
    # (bf16, cpu_some's shape: 11 ms against 3 ms on the dev box; the same sums, in the same order)
    if K == 1:
        return y_TKD[:, 0].to(acc, memory_format=torch.contiguous_format, copy=True)
    out_TD = torch.add(y_TKD[:, 0].to(acc), y_TKD[:, 1])
    for j in range(2, K):
        out_TD += y_TKD[:, j]
    return out_TD


class _Replicate(torch.autograd.Function):
    """The experts' input: token ``token_S[s]`` at sorted row ``s``, cast to the compute dtype ``dt``.

    Cast first, then gather (the K-fold copy is made in the narrow dtype). Autograd's own backward of
    that gather would add each token's K input-gradient pieces into a buffer of ``dt``: on CUDA an
    atomic add in bf16 per piece. Here the pieces are gathered into token order and summed in ``acc``
    (fp32 for bf16 experts), then cast once to the input's dtype."""

    @staticmethod
    def forward(ctx, x_TD, dt, token_S, inverse_S, K, acc):
        ctx.save_for_backward(inverse_S)
        ctx.K, ctx.acc, ctx.x_dtype = K, acc, x_TD.dtype
        return x_TD.to(dt).index_select(0, token_S)

    @staticmethod
    def backward(ctx, dx_SD):
        (inverse_S,) = ctx.saved_tensors
        return _sum_slots(dx_SD, inverse_S, ctx.K, ctx.acc).to(ctx.x_dtype), None, None, None, None, None


class _Unpermute(torch.autograd.Function):
    """Sum each token's K gated slot outputs, accumulating in ``acc`` (fp32 for bf16 experts).

    Autograd would scatter-add the gradient of a gather into a zero-filled
    buffer; the inverse of a permutation is a gather, so backward is one
    ``index_select`` of the token rows.
    """

    @staticmethod
    def forward(ctx, y_SD, inverse_S, token_S, K, acc):
        ctx.save_for_backward(token_S)
        ctx.y_dtype = y_SD.dtype
        return _sum_slots(y_SD, inverse_S, K, acc)

    @staticmethod
    def backward(ctx, g_TD):
        (token_S,) = ctx.saved_tensors
        return g_TD.to(ctx.y_dtype).index_select(0, token_S), None, None, None, None
