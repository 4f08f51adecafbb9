"""The padded batched path: frozen experts on CPU (bf16, or small fp32 ones) as bmm over load-sorted expert
groups."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .. import dispatch as tuning
from .activation import _activation_grad
from .expert_loop import _round_up
from .plan import _expert_of_row


@dataclass
class PaddedLayout:
    """Where each expert's rows sit in the padded buffer."""

    experts: torch.Tensor  # the expert of every piece in buffer order (largest first): the weights' gather index
    groups: list[tuple[int, int, int, int]]  # (first, stop) positions in ``experts``, cap rows each, first row
    pos_S: torch.Tensor  # buffer row of every sorted slot
    slot_R: torch.Tensor  # sorted slot in every buffer row; padding rows repeat slot 0 (see _padded_rows)
    rows: int  # rows of the whole buffer


def padded_layout(counts: list[int], device: torch.device | str = "cpu", group: int | None = None,
                  bucket: int | None = None, chunk: int | None = None) -> PaddedLayout:
    """Each expert's slots cut into pieces of ``chunk`` rows (default PADDED_CHUNK) and a remainder;
    pieces sorted by size (stable), cut into groups of ``group`` (default PADDED_GROUP), each piece
    of a group padded to the group's largest rounded up to ``bucket`` (default ROW_BUCKET). A piece
    computes with its expert's weights (gathered once per piece); empty experts get nothing."""
    group, bucket, chunk = group or tuning.PADDED_GROUP, bucket or tuning.ROW_BUCKET, chunk or tuning.PADDED_CHUNK
    piece_expert, piece_rows, first_piece_E = [], [], []
    for e, n in enumerate(counts):
        first_piece_E.append(len(piece_rows))
        for start in range(0, n, chunk):
            piece_expert.append(e)
            piece_rows.append(min(chunk, n - start))
    order = sorted(range(len(piece_rows)), key=lambda p: -piece_rows[p])
    base_P, groups, rows = [0] * len(piece_rows), [], 0
    for first in range(0, len(order), group):
        stop = min(first + group, len(order))
        cap = _round_up(piece_rows[order[first]], bucket)
        for j in range(first, stop):
            base_P[order[j]] = rows + (j - first) * cap
        groups.append((first, stop, cap, rows))
        rows += (stop - first) * cap
    counts_E = torch.tensor(counts, device=device)
    expert_S = _expert_of_row(counts_E, sum(counts))
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    rank_S = torch.arange(expert_S.numel(), device=device) - starts_E[expert_S]
    piece_S = torch.tensor(first_piece_E, device=device)[expert_S] + torch.div(rank_S, chunk, rounding_mode="floor")
    pos_S = torch.tensor(base_P, device=device)[piece_S] + rank_S % chunk
    slot_R = pos_S.new_zeros(rows)
    slot_R[pos_S] = torch.arange(pos_S.numel(), device=device)
    experts = torch.tensor([piece_expert[p] for p in order], dtype=torch.long, device=device)
    return PaddedLayout(experts, groups, pos_S, slot_R, rows)


def _padded_rows(rows_SD: torch.Tensor, layout: PaddedLayout) -> torch.Tensor:
    """The padded buffer of ``rows_SD``: a gather (3-5x faster here than an ``index_copy_`` into
    zeros). Padding rows hold copies of slot 0: every op of the padded path is row-wise (bmm, the
    activation and its gradient), so a padding row only ever reaches its own output row, which is
    never gathered back; frozen weights have no gradient that would sum over rows."""
    return rows_SD.index_select(0, layout.slot_R)


def _padded_bmm(a_RX: torch.Tensor, w_EXY: torch.Tensor, layout: PaddedLayout,
                bias_EY: torch.Tensor | None = None) -> torch.Tensor:
    """Each group's rows of ``a`` times its experts' ``w`` (+ bias); ``w`` already in layout order."""
    out = a_RX.new_empty(a_RX.shape[0], w_EXY.shape[2])
    for first, stop, cap, r0 in layout.groups:
        n, rows = stop - first, slice(r0, r0 + (stop - first) * cap)
        a, o, w = a_RX[rows].view(n, cap, -1), out[rows].view(n, cap, -1), w_EXY[first:stop]
        if bias_EY is None:
            torch.bmm(a, w, out=o)
        else:
            torch.baddbmm(bias_EY[first:stop].unsqueeze(1), a, w, out=o)
    return out


def _in_layout_order(t: torch.Tensor | None, layout: PaddedLayout, dt: torch.dtype) -> torch.Tensor | None:
    """Expert weights (or biases) gathered into the layout's order, in ``dt``: one temporary copy.

    Stored in another dtype (fp32 experts under bf16 autocast), each expert is cast as it is copied:
    a gather first would hold a full copy in the storage dtype too (403 MB per matrix of a
    seed000_some layer)."""
    if t is None:
        return None
    if t.dtype == dt:
        return t.index_select(0, layout.experts)
    out = t.new_empty((layout.experts.numel(), *t.shape[1:]), dtype=dt)
    for j, e in enumerate(layout.experts.tolist()):
        out[j].copy_(t[e])
    return out


class _PaddedFrozenMLP(torch.autograd.Function):
    """``g_S * (act(x W1_e + b1_e) W2_e + b2_e)`` as bmm over padded expert groups; frozen weights only
    (backward: the two input-gradient matmuls, the gates' gradient)."""

    @staticmethod
    def forward(ctx, x_SD, layout, activation, gates_S, w1_EDF, b1_EF, w2_EFD, b2_ED):
        # weights arrive in their storage dtype: gathered, cast copies are temporaries (one matrix at a
        # time), never saved: fp32-stored frozen experts under bf16 autocast would otherwise be held
        # twice until backward
        dt = x_SD.dtype
        pre_RF = _padded_bmm(_padded_rows(x_SD, layout), _in_layout_order(w1_EDF, layout, dt), layout,
                             _in_layout_order(b1_EF, layout, dt))
        u_SD = _padded_bmm(activation(pre_RF), _in_layout_order(w2_EFD, layout, dt), layout,
                           _in_layout_order(b2_ED, layout, dt)).index_select(0, layout.pos_S)
        ctx.save_for_backward(pre_RF, u_SD if gates_S is not None else None, gates_S, w1_EDF, w2_EFD)
        ctx.layout, ctx.activation = layout, activation
        return u_SD if gates_S is None else u_SD * gates_S.unsqueeze(1)

    @staticmethod
    def backward(ctx, dy_SD):
        pre_RF, u_SD, gates_S, w1_EDF, w2_EFD = ctx.saved_tensors
        layout, dt = ctx.layout, pre_RF.dtype
        dy_SD = dy_SD.to(dt)
        dg = None
        if gates_S is not None:
            dg = (dy_SD * u_SD).sum(1) if ctx.needs_input_grad[3] else None
            dy_SD = dy_SD * gates_S.unsqueeze(1)
        w2_T = _in_layout_order(w2_EFD, layout, dt).transpose(1, 2)
        d_act = _padded_bmm(_padded_rows(dy_SD, layout), w2_T, layout)
        d_pre = _activation_grad(ctx.activation, pre_RF, d_act)  # padding rows: from slot 0's copies, never read back
        del d_act
        w1_T = _in_layout_order(w1_EDF, layout, dt).transpose(1, 2)
        dx = _padded_bmm(d_pre, w1_T, layout).index_select(0, layout.pos_S)
        return dx, None, None, dg, None, None, None, None


def padded_frozen_mlp(x_SD: torch.Tensor, layout: PaddedLayout, w1_EDF: torch.Tensor,
                      b1_EF: torch.Tensor | None, w2_EFD: torch.Tensor, b2_ED: torch.Tensor | None,
                      activation: Callable = F.gelu, gates_S: torch.Tensor | None = None) -> torch.Tensor:
    """The padded-bmm expert MLP on ``x_SD`` sorted by expert (:func:`padded_layout` of its counts), in
    x's dtype (frozen weights, any storage dtype)."""
    return _PaddedFrozenMLP.apply(x_SD.contiguous(), layout, activation, gates_S, w1_EDF, b1_EF, w2_EFD, b2_ED)
