"""Dropless token-to-expert dispatch, shared by the SoME layer and the classic MoE.

One permutation per forward: the ``T*K`` token slots are sorted by expert id
(stable argsort, so slots of one expert keep token order); experts run on
contiguous slices of the sorted buffer; each slot's output is scaled by its
gate and the K slots of a token are gathered back and summed with fp32
accumulation (:class:`_Unpermute`, whose backward is one gather). No
per-token Python.

**Expert groups.** ``expert_fn(x_SD, counts)`` gets the sorted token copies and
``counts`` (slots per expert): on CPU a :class:`Groups` (a ``list[int]``, one
host sync per forward, that also carries the sorted gates so that
:func:`grouped_mlp` applies them inside its autograd function); on CUDA with bf16 compute (and
anywhere under :func:`static_dispatch` or a bf16 ``torch.compile``) :class:`DeviceGroups`
(device-side offsets, computed once per layer), and every expert op is one grouped matmul (``F.grouped_mm``;
``torch._grouped_mm`` before torch 2.10) over the
offsets: no ``.item()``/``.tolist()`` in the hot path, capturable in a CUDA
graph. :func:`grouped_mlp` and :func:`grouped_swiglu` accept both.

**Frozen experts** (buffers, ``requires_grad=False``: SoME) go through a custom
autograd function whose backward runs only the two input-gradient matmuls
per expert; weight gradients are computed only for the weights autograd asks
for (trainable MoE experts). On CPU each expert's ops run back to back on its
slice while it is in cache, at row counts rounded up to ``ROW_BUCKET`` in bf16
(oneDNN builds a kernel per shape), the activation on ATen's own kernels
(:func:`_aten_kernels`); the function saves the pre-activation (and the ungated
output, for the gates' gradient) and never the weights' copies.
Weights stored in bf16 are computed in bf16 (CPU AMX, GPU tensor cores);
inside autocast the autocast dtype is used; the result is cast back to the
input dtype. bf16 frozen experts on CPU take a padded-bmm path
(:func:`padded_frozen_mlp`): experts sorted by load, in groups padded to a common row count
(:func:`padded_layout`), a few ``bmm`` per op instead of one small matmul per expert.

Why not plain autograd over per-expert ops (the previous version): its
``split``/``cat`` of E slices and per-op autograd bookkeeping cost more than
the matmuls on the 2 shared CPU cores (a 32 MB ``cat`` took up to 0.5 s under
contention), and a ``bmm`` over T (1 x K) @ (K x D) products for the gate sum
is a slow per-matrix loop on CPU. Figures: docs/benchmarks.md (``somoe bench
layer``). Not done: prepacking frozen bf16 weights for oneDNN
(``mkldnn._reorder_linear_weight``) measured 8.6 ms vs 14.5 ms for 64 experts'
first matmul, but costs a packed copy of every expert.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, NamedTuple, Union

import torch
import torch.nn.functional as F


class DeviceGroups(NamedTuple):
    """Where each expert's rows sit in the sorted buffer, on the device (no host sync): computed once per
    layer by :func:`dispatch` and shared by every grouped matmul of its forward and backward."""

    offsets: torch.Tensor  # int32 (E,): end row of each expert's block (cumulative counts)
    expert_S: torch.Tensor  # the expert of every sorted row (the bias rows' gather index)

    @classmethod
    def of(cls, counts_E: torch.Tensor, rows: int) -> "DeviceGroups":
        """From slots per expert (a device tensor), for callers that hold only the counts."""
        return cls(torch.cumsum(counts_E, 0, dtype=torch.int32), _expert_of_row(counts_E, rows))

    @property
    def num_experts(self) -> int:
        return self.offsets.numel()


# slots per expert: host list (loop), a device tensor or device groups (grouped mm, no host sync)
Counts = Union[list[int], torch.Tensor, DeviceGroups]
# grouped expert function: (x_SD sorted by expert, counts per expert) -> y_SD in the same order
GroupedFn = Callable[[torch.Tensor, Counts], torch.Tensor]
# the public form (torch >= 2.10) where it exists, else the private op (same semantics); None: too old
_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


@dataclass
class Plan:
    """Where each token slot goes: the permutation that sorts slots by expert."""

    order_S: torch.Tensor  # slot index (into the flattened T*K slots) at each sorted position
    token_S: torch.Tensor  # token index at each sorted position
    expert_S: torch.Tensor  # expert id at each sorted position (non-decreasing)
    counts: Counts  # slots per expert, length E: a list (one host sync) or, for grouped mm, a device tensor


def expert_counts(expert_idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Slots per expert (int64, length E), without a host sync: CUDA's ``bincount`` reads the
    maximum index back to size its output; a scatter-add into E zeros does not."""
    flat = expert_idx.reshape(-1).long()
    return flat.new_zeros(num_experts).scatter_add_(0, flat, torch.ones_like(flat))


def slot_counts(expert_idx_TK: torch.Tensor, num_experts: int, weight_T: torch.Tensor | None = None,
                live_K: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted slots per expert (float, length E): slot ``(t, j)`` counts ``weight_T[t] * live_K[j]``
    (0 for PAD tokens that statistics must not see, 0 for the dead slots of a masked top-k)."""
    T, K = expert_idx_TK.shape
    w_TK = expert_idx_TK.new_ones((), dtype=torch.float32).expand(T, K)
    if weight_T is not None:
        w_TK = w_TK * weight_T.unsqueeze(1)
    if live_K is not None:
        w_TK = w_TK * live_K.to(torch.float32)
    w_S = w_TK.reshape(-1)
    return w_S.new_zeros(num_experts).scatter_add_(0, expert_idx_TK.reshape(-1).long(), w_S)


def plan(expert_idx_TK: torch.Tensor, num_experts: int, host_counts: bool = True,
         counts_E: torch.Tensor | None = None) -> Plan:
    """Sort the flattened slots by expert id (stable) and count slots per expert (``counts_E``: the
    caller's :func:`expert_counts` of the same indices, when it has them)."""
    flat_S = expert_idx_TK.reshape(-1)
    expert_S, order_S = torch.sort(flat_S, stable=True)
    counts = expert_counts(flat_S, num_experts) if counts_E is None else counts_E
    if host_counts:
        counts = counts.tolist()
    return Plan(order_S, order_S // expert_idx_TK.shape[1], expert_S, counts)


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


def _device_counts(counts: Counts) -> bool:
    return isinstance(counts, (torch.Tensor, DeviceGroups))


def _groups(counts: torch.Tensor | DeviceGroups, rows: int) -> DeviceGroups:
    return counts if isinstance(counts, DeviceGroups) else DeviceGroups.of(counts, rows)


def grouped_mm_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether experts on ``device`` computing in ``dtype`` use the grouped matmul (no host sync).

    CUDA bf16 on compute capability >= 8.0 only: that is what the kernel
    supports. On CPU the op exists but loops over groups itself and has no
    backward, so the Python loop with preallocated outputs is used there.
    """
    if device.type != "cuda" or dtype != torch.bfloat16 or _grouped_mm is None:
        return False
    return torch.cuda.get_device_capability(device) >= (8, 0)


class Groups(list):
    """Host counts (a ``list[int]``, so any ``expert_fn`` can ``split`` by it) that also carry
    the sorted slots' gates: an expert function that can apply them itself (:func:`grouped_mlp`,
    which then saves the ungated output and no gated copy) does so and sets ``gates_applied``
    so that :func:`dispatch` does not multiply again."""

    def __init__(self, counts: list[int], gates_S: torch.Tensor | None = None):
        super().__init__(counts)
        self.gates_S = gates_S
        self.gates_applied = False


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
        # traced whole (no host value, fixed shapes) where the grouped matmul traces: bf16 compute.
        # Compiled with inductor this path once gave wrong gradients on an H100 (torch 2.11: a
        # seed000_some step's gradients 85% off eager's while the loss matched); the CUDA test
        # test_compiled_and_cuda_graph_steps_give_eager_losses_on_cuda checks it on every GPU run
        if dt == torch.bfloat16 and _grouped_mm is not None:
            return _dispatch(x_TD, expert_idx_TK, gates_TK, expert_fn, num_experts, dt, True, counts_E)
        return _dispatch_eager(x_TD, expert_idx_TK, gates_TK, expert_fn, num_experts, dt, grouped, counts_E)
    return _dispatch(x_TD, expert_idx_TK, gates_TK, expert_fn, num_experts, dt, grouped, counts_E)


@torch.compiler.disable
def _dispatch_eager(x_TD, expert_idx_TK, gates_TK, expert_fn, num_experts, dt, grouped: bool,
                    counts_E) -> torch.Tensor:
    """Other compute dtypes run eagerly under ``torch.compile`` (a graph break): host counts, traced,
    would become guards (``counts[2] == 65``) and recompile every step, and the grouped matmul's
    fake-tensor rule accepts bf16 only (torch 2.13)."""
    return _dispatch(x_TD, expert_idx_TK, gates_TK, expert_fn, num_experts, dt, grouped, counts_E)


def _dispatch(x_TD, expert_idx_TK, gates_TK, expert_fn, num_experts, dt, grouped: bool,
              counts_E: torch.Tensor | None) -> torch.Tensor:
    K = expert_idx_TK.shape[1]
    p = plan(expert_idx_TK, num_experts, host_counts=not grouped, counts_E=counts_E)
    x_SD = x_TD.to(dt).index_select(0, p.token_S)  # the K-fold copy: matmul operands must be contiguous
    inverse_S = torch.empty_like(p.order_S)
    inverse_S[p.order_S] = torch.arange(p.order_S.numel(), device=p.order_S.device)
    acc = torch.float64 if x_TD.dtype == torch.float64 else torch.float32  # fp32 sums for bf16/fp16 slots
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

    @staticmethod
    def backward(ctx, g_TD):
        (token_S,) = ctx.saved_tensors
        return g_TD.to(ctx.y_dtype).index_select(0, token_S), None, None, None, None


def compute_dtype(x: torch.Tensor, weight_dtype: torch.dtype) -> torch.dtype:
    """The autocast dtype when autocast is on for ``x``'s device, else the weights' dtype."""
    device_type = x.device.type
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
    except TypeError:  # torch < 2.4: per-device functions
        if device_type == "cpu" and torch.is_autocast_cpu_enabled():
            return torch.get_autocast_cpu_dtype()
        if device_type == "cuda" and torch.is_autocast_enabled():
            return torch.get_autocast_gpu_dtype()
    return weight_dtype


def host_counts(counts: Counts) -> list[int]:
    """Counts as a list (a host sync when they are a device tensor)."""
    if isinstance(counts, DeviceGroups):
        counts = torch.diff(counts.offsets, prepend=counts.offsets.new_zeros(1))
    return counts.tolist() if isinstance(counts, torch.Tensor) else list(counts)


def per_expert(fn: Callable[[int, torch.Tensor], torch.Tensor]) -> GroupedFn:
    """Adapt ``fn(e, x_slice) -> y_slice`` to the grouped form (empty experts skipped)."""

    def grouped(x_SD: torch.Tensor, counts: Counts) -> torch.Tensor:
        counts = host_counts(counts)
        # one split (its backward is one cat), not E slices (each slice's backward zero-fills all of x_SD)
        outs = [fn(e, x_nD) for e, x_nD in enumerate(x_SD.split(counts)) if counts[e]]
        return torch.cat(outs) if outs else x_SD.new_zeros(0, x_SD.shape[1])

    return grouped


# --- grouped matmul primitives (no autograd; the Functions below own the backward) ---------------
def _expert_of_row(counts: torch.Tensor, rows: int) -> torch.Tensor:
    # output_size keeps repeat_interleave from reading the total back to the host
    return torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts, output_size=rows)


def _gmm(a_SK: torch.Tensor, b_EKN: torch.Tensor, counts: Counts, bias_EN: torch.Tensor | None = None) -> torch.Tensor:
    """Row block ``e`` of ``a`` times ``b[e]`` (+ ``bias[e]``), one output buffer, no concatenation."""
    if _device_counts(counts):
        groups = _groups(counts, a_SK.shape[0])
        out = _grouped_mm(a_SK, b_EKN, offs=groups.offsets)
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
        return _grouped_mm(a_SK.t(), d_SN, offs=_groups(counts, a_SK.shape[0]).offsets)
    out = a_SK.new_zeros(len(counts), a_SK.shape[1], d_SN.shape[1])
    for e, s, t in _slices(counts):
        n = _bucket(t - s, a_SK)  # the rows past t meet zero rows of d: exact
        torch.mm(_rows(a_SK, s, n).t(), _zero_padded(d_SN[s:t], n), out=out[e])
    return out


def _group_sum(d_SN: torch.Tensor, counts: Counts) -> torch.Tensor:
    """Per-expert sum of rows (the bias gradient): (E, N)."""
    if _device_counts(counts):
        groups = _groups(counts, d_SN.shape[0])
        return d_SN.new_zeros(groups.num_experts, d_SN.shape[1]).index_add_(0, groups.expert_S, d_SN)
    out = d_SN.new_zeros(len(counts), d_SN.shape[1])
    for e, s, t in _slices(counts):
        torch.sum(d_SN[s:t], 0, out=out[e])
    return out


def _activation_grad(activation: Callable, pre: torch.Tensor, d_act: torch.Tensor) -> torch.Tensor:
    """``d_act * activation'(pre)``, with the ATen kernels for the common activations."""
    if activation is F.gelu:
        return torch.ops.aten.gelu_backward(d_act, pre)
    if activation is F.relu:
        return torch.ops.aten.threshold_backward(d_act, pre, 0)
    if activation is F.silu:
        return torch.ops.aten.silu_backward(d_act, pre)
    with torch.enable_grad():
        leaf = pre.detach().requires_grad_(True)
        return torch.autograd.grad(activation(leaf), leaf, d_act)[0]


def _aten_kernels(fn: Callable) -> Callable:
    """``fn`` run with oneDNN switched off, so that ATen uses its own CPU kernels.

    ATen sends exact GELU and its gradient on contiguous CPU tensors to oneDNN, which builds a
    kernel for every new shape. The per-expert loop's slices have a new row count at almost every
    call in training (fp32 rows are not bucketed): 128 slices of random rows took, through oneDNN,
    7.5 ms (GELU) and 27.1 ms (its gradient) in fp32 against 3.4 and 5.3 ms with ATen's kernels
    (``python scripts/onednn_shapes.py``, dev box), and a cpu_some fp32 step spent ~230 of ~950 ms
    there. Whole-buffer calls (the padded path) keep oneDNN, whose kernel is 2x ATen's on one large
    bf16 tensor. The switch is global, so it brackets only the elementwise call: bf16 matmuls need
    oneDNN.
    """
    def on_aten(*args):
        if not torch.backends.mkldnn.enabled:
            return fn(*args)
        torch.backends.mkldnn.enabled = False
        try:
            return fn(*args)
        finally:
            torch.backends.mkldnn.enabled = True

    return on_aten


class _ActivationOnAten(torch.autograd.Function):
    """``activation(x)`` with its gradient, both on ATen's kernels (:func:`_aten_kernels`), for the
    plain-autograd per-expert loop of the LoRA ablation (autograd's own GELU node would go to oneDNN)."""

    @staticmethod
    def forward(ctx, x, activation):
        ctx.save_for_backward(x)
        ctx.activation = activation
        return _aten_kernels(activation)(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return _aten_kernels(_activation_grad)(ctx.activation, x, grad), None


def _grad_or_none(needed: bool, fn: Callable[[], torch.Tensor]) -> torch.Tensor | None:
    return fn() if needed else None


# oneDNN (CPU bf16/fp16 matmuls) builds a kernel for every new (rows, cols, inner) shape, ~0.4 ms each:
# 10x a ~500 x 128 x 128 bf16 matmul itself on the dev box's AMX cores (scripts/onednn_shapes.py).
# Expert slices have a new row count at every call, so on that path rows are rounded up to a multiple
# of ROW_BUCKET: a few dozen shapes in all, cached after the first steps (fp32 goes to MKL's sgemm,
# which has no such cost).
ROW_BUCKET = 32


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _bucket(rows: int, like: torch.Tensor) -> int:
    """The row count a per-expert matmul on ``like``'s device and dtype runs at (>= ``rows``)."""
    if like.device.type == "cpu" and like.dtype in (torch.bfloat16, torch.float16):
        return _round_up(rows, ROW_BUCKET)
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
    return like_SD.new_empty(like_SD.shape[0] + ROW_BUCKET, width)


def _slices(counts: list[int]):
    """``(expert, start, end)`` of every non-empty expert's rows in the sorted buffer."""
    start = 0
    for e, n in enumerate(counts):
        if n:
            yield e, start, start + n
            start += n


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
    db1 = dy_SD.new_zeros(E, w1_EDF.shape[2]) if need[5] and ctx.has_b1 else None
    dw2 = torch.zeros_like(w2_EFD) if need[6] else None
    db2 = dy_SD.new_zeros(E, w2_EFD.shape[2]) if need[7] and ctx.has_b2 else None
    for i, (e, s, t) in enumerate(_slices(counts)):
        pre = pres[i]
        n = pre.shape[0]
        dy = _zero_padded(dy_gated[s:t], n) if weight_grads else dy_gated[s:s + n]
        if dw2 is not None:
            _mm_into(dw2[e], act_on_aten(pre).t(), dy)
        if db2 is not None:
            torch.sum(dy, 0, out=db2[e])
        d_pre = act_grad_on_aten(act, pre, dy @ w2_EFD[e].to(dt).t())
        if dx is not None:
            torch.mm(d_pre, w1_EDF[e].to(dt).t(), out=dx[s:s + n])
        if dw1 is not None:
            _mm_into(dw1[e], _rows(x_SD, s, n).t(), d_pre)
        if db1 is not None:
            torch.sum(d_pre, 0, out=db1[e])
    return None if dx is None else dx[:S], (dw1, db1, dw2, db2)


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


@dataclass
class LoRA:
    """Per-expert low-rank adapters: ``W1 + scale * A1 @ B1``, ``W2 + scale * A2 @ B2``."""

    a1_EDR: torch.Tensor
    b1_ERF: torch.Tensor
    a2_EFR: torch.Tensor
    b2_ERD: torch.Tensor
    scale: float


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
    """The padded path's layout where it wins: bf16 on CPU, frozen weights, rows within PADDED_MAX_WASTE."""
    if dt != torch.bfloat16 or x_SD.device.type != "cpu" or _device_counts(counts):
        return None
    if any(w is not None and w.requires_grad for w in weights):
        return None
    layout = padded_layout(counts, x_SD.device)
    loop_rows = sum(_bucket(n, x_SD) for n in counts)
    return layout if 0 < layout.rows <= PADDED_MAX_WASTE * loop_rows else None


def grouped_swiglu(x_SD: torch.Tensor, counts: Counts, wg_EDF: torch.Tensor, w1_EDF: torch.Tensor,
                   w2_EFD: torch.Tensor) -> torch.Tensor:
    """``(silu(x Wg_e) * (x W1_e)) W2_e`` per expert slice; dtype rules as :func:`grouped_mlp`."""
    dt = compute_dtype(x_SD, w1_EDF.dtype)
    counts = _aligned_or_host(counts, x_SD, w1_EDF.shape[2])
    x_SD, wg_EDF, w1_EDF, w2_EFD = (t.to(dt) for t in (x_SD, wg_EDF, w1_EDF, w2_EFD))
    with torch.autocast(x_SD.device.type, enabled=False):
        return _GroupedSwiGLU.apply(x_SD.contiguous(), counts, wg_EDF, w1_EDF, w2_EFD)


def _lora_mlp(x_SD, counts: list[int], w1_EDF, b1_EF, w2_EFD, b2_ED, lora: LoRA, activation, dt) -> torch.Tensor:
    """The LoRA ablation: plain autograd over per-expert ops (adapters are trainable)."""
    w1s, w2s = w1_EDF.unbind(0), w2_EFD.unbind(0)  # one gradient buffer per stacked tensor, not per expert
    b1s = b1_EF.unbind(0) if b1_EF is not None else None
    b2s = b2_ED.unbind(0) if b2_ED is not None else None
    ad = [t.to(dt).unbind(0) for t in (lora.a1_EDR, lora.b1_ERF, lora.a2_EFR, lora.b2_ERD)]

    def expert(e: int, x: torch.Tensor) -> torch.Tensor:
        h = torch.addmm(b1s[e], x, w1s[e]) if b1s is not None else x @ w1s[e]
        h = _ActivationOnAten.apply(h + lora.scale * ((x @ ad[0][e]) @ ad[1][e]), activation)
        y = torch.addmm(b2s[e], h, w2s[e]) if b2s is not None else h @ w2s[e]
        return y + lora.scale * ((h @ ad[2][e]) @ ad[3][e])

    return per_expert(expert)(x_SD, counts)


# --- padded batched path: bf16 frozen experts on CPU ---------------------------------------------
# Why: a bf16 (AMX/oneDNN) matmul of ~256 rows pays a fixed cost per call, and so does every small
# elementwise op; 64 experts x ~10 ops per step cost more than the multiply-adds (64 separate
# 256 x 256 x 512 matmuls: 4.0 ms; one bmm over them: 1.6 ms, on the dev box). So experts are padded
# to a common row count and each op is a few ``bmm`` (or one elementwise call) over (experts, cap, .).
# Padding every expert to the busiest one wastes rows with the routing's imbalance: the busiest
# expert of a cpu_some layer holds 1.5x the mean slots at initialisation and 5-16x in the first
# hundred training steps, so a single cap refused the padded path wherever training spends its
# time. Instead the experts (or their pieces, below) are sorted by size and cut into groups of
# PADDED_GROUP, each padded only to its own largest, rounded up to ROW_BUCKET. A fixed group size and
# bucketed caps keep the set of bmm shapes small (oneDNN builds a kernel per new shape, ~1.5 ms for
# a bmm). Groups of 4 or 16, or cuts chosen by a cost model, timed within noise of 8
# (scripts/padded_groups.py). The weights are gathered into that order, one temporary copy per
# pass (0.7 ms for 64 experts' 16 MB in bf16), never saved: frozen experts are not held twice.
PADDED_GROUP = 8
# Experts with more slots run as several pieces of at most this many rows. oneDNN keeps a primitive
# for every bf16 bmm shape it has seen, holding memory that grows with the shape (RSS +14 MB for each
# new (8, 8192, 128) x (8, 128, 128), against +2 MB for a same-sized mm, on the dev box): with caps up to a
# trained cpu_some's 8k-slot experts, 120 training steps' peak RSS was 3.6 GB against 2.0-2.4 GB
# for the loop (1.96 GB with ONEDNN_PRIMITIVE_CACHE_CAPACITY=64, but slower). Pieces bound the caps
# (so the shapes and their memory), and an expert's full pieces pad nothing. 120 steps of cpu_some
# (`somoe train --preset cpu_some train.max_steps=120`): 62.0 / 62.6 / 61.4 s at 512 rows,
# 63.7 s at 1024, 66.1 s at 256, 68.1 s for the loop; peak RSS 2.2-2.5 GB.
PADDED_CHUNK = 512
# Fall back to the per-expert loop where the padded rows exceed this many times the loop's own
# (bucketed) rows.
PADDED_MAX_WASTE = 1.5


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
    group, bucket, chunk = group or PADDED_GROUP, bucket or ROW_BUCKET, chunk or PADDED_CHUNK
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
