"""The CPU expert loop: host counts, one expert's matmuls and activation back to back on its slice,
rows bucketed to ``ROW_BUCKET`` (read from the package, where tests patch it)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import dispatch as tuning
from .activation import _activation_grad, _aten_kernels




def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _bucket(rows: int, like: torch.Tensor) -> int:
    """The row count a per-expert matmul on ``like``'s device and dtype runs at (>= ``rows``)."""
    if like.device.type == "cpu" and like.dtype in (torch.bfloat16, torch.float16):
        return _round_up(rows, tuning.ROW_BUCKET)
    return rows


def _rows(buf: torch.Tensor, start: int, n: int) -> torch.Tensor:
    """Rows ``start .. start + n`` of ``buf``, zero rows past its end (a copy only then)."""
    if start + n <= buf.shape[0]:
        return buf[start:start + n]
    return _zero_padded(buf[start:], n)


def _zero_padded(t_ND: torch.Tensor, n: int) -> torch.Tensor:
    return t_ND if t_ND.shape[0] == n else F.pad(t_ND, (0, 0, 0, n - t_ND.shape[0]))


def _with_slack(like_SD: torch.Tensor, width: int) -> torch.Tensor:
    """An output buffer for per-expert results of bucketed row counts: each expert writes its padded
    block at its own start, in expert order, so the rows its padding spills into belong to the next
    expert and are overwritten by it; ``ROW_BUCKET`` spare rows take the last expert's spill."""
    return like_SD.new_empty(like_SD.shape[0] + tuning.ROW_BUCKET, width)


def _slices(counts: list[int]):
    """``(expert, start, end)`` of every non-empty expert's rows in the sorted buffer."""
    start = 0
    for e, n in enumerate(counts):
        if n:
            yield e, start, start + n
            start += n

def _affine(x: torch.Tensor, w: torch.Tensor, b_EN: torch.Tensor | None, e: int) -> torch.Tensor:
    return x @ w if b_EN is None else torch.addmm(b_EN[e].to(x.dtype), x, w)


def _affine_into(out: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b_EN: torch.Tensor | None, e: int) -> None:
    if b_EN is None:
        torch.mm(x, w, out=out)
    else:
        torch.addmm(b_EN[e].to(x.dtype), x, w, out=out)


def _expert_loop_forward(x_SD, counts: list[int], activation, w1_EDF, b1_EF, w2_EFD, b2_ED):
    """The ungated outputs ``u_SD`` and every expert's pre-activation, one expert at a time.

    Row counts are bucketed (see ROW_BUCKET): an expert reads the next expert's rows past its
    own and writes its output there, and the next expert overwrites them (``_with_slack``);
    ``pre`` keeps the bucketed rows so that backward runs at the same shapes."""
    dt = x_SD.dtype
    u_SD, pres = _with_slack(x_SD, w2_EFD.shape[2]), []
    activation = _aten_kernels(activation)
    for e, s, t in _slices(counts):
        n = _bucket(t - s, x_SD)
        pre = _affine(_rows(x_SD, s, n), w1_EDF[e].to(dt), b1_EF, e)
        _affine_into(u_SD[s:s + n], activation(pre), w2_EFD[e].to(dt), b2_ED, e)
        pres.append(pre)
    return u_SD[:x_SD.shape[0]], pres


def _mm_into(dst: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``dst = a @ b``; through a temporary when ``dst`` keeps the weights' (wider) dtype."""
    if dst.dtype == a.dtype:
        torch.mm(a, b, out=dst)
    else:
        dst.copy_(a @ b)


def _expert_loop_backward(ctx, dy_SD, x_SD, pres, gates_S, w1_EDF, w2_EFD):
    """Host-count backward, one expert at a time; frozen experts cost two matmuls each.

    ``dy`` (gated: ``g * dy``, one op over all slots) is read in the forward's bucketed windows.
    For frozen experts the rows past an expert's own are the next expert's, and only spoil the
    dx rows that the next expert then overwrites. Weight gradients sum over rows, so there the
    window is the expert's own rows and zeros.
    """
    need, counts, act, dt = ctx.needs_input_grad, ctx.counts, ctx.activation, ctx.dt
    act_on_aten, act_grad_on_aten = _aten_kernels(act), _aten_kernels(_activation_grad)
    E, S = w1_EDF.shape[0], dy_SD.shape[0]
    weight_grads = any(need[4:])
    dy_gated = _with_slack(dy_SD, dy_SD.shape[1])
    if gates_S is not None:
        torch.mul(dy_SD, gates_S.unsqueeze(1), out=dy_gated[:S])
    else:
        dy_gated[:S].copy_(dy_SD)
    dy_gated[S:].zero_()
    dx = _with_slack(dy_SD, w1_EDF.shape[1]) if need[0] else None
    dw1 = torch.zeros_like(w1_EDF) if need[4] else None
    # bias gradients sum an expert's rows: into fp32 even when the rows are bf16 (one rounding fewer)
    acc = torch.float64 if dt == torch.float64 else torch.float32
    db1 = dy_SD.new_zeros(E, w1_EDF.shape[2], dtype=acc) if need[5] and ctx.has_b1 else None
    dw2 = torch.zeros_like(w2_EFD) if need[6] else None
    db2 = dy_SD.new_zeros(E, w2_EFD.shape[2], dtype=acc) if need[7] and ctx.has_b2 else None
    for i, (e, s, t) in enumerate(_slices(counts)):
        pre = pres[i]
        n = pre.shape[0]
        dy = _zero_padded(dy_gated[s:t], n) if weight_grads else dy_gated[s:s + n]
        if dw2 is not None:
            _mm_into(dw2[e], act_on_aten(pre).t(), dy)
        if db2 is not None:
            torch.sum(dy, 0, dtype=acc, out=db2[e])
        d_pre = act_grad_on_aten(act, pre, dy @ w2_EFD[e].to(dt).t())
        if dx is not None:
            torch.mm(d_pre, w1_EDF[e].to(dt).t(), out=dx[s:s + n])
        if dw1 is not None:
            _mm_into(dw1[e], _rows(x_SD, s, n).t(), d_pre)
        if db1 is not None:
            torch.sum(d_pre, 0, dtype=acc, out=db1[e])
    return None if dx is None else dx[:S], (dw1, db1, dw2, db2)
