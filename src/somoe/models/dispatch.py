"""Dropless token-to-expert dispatch, shared by the SoME layer and the classic MoE.

One permutation per forward: the ``T*K`` token slots are sorted by expert id
(stable argsort, so slots of one expert keep token order), experts run on
contiguous slices of the sorted buffer, and the outputs are un-permuted and
combined with the gate weights in one weighted sum. No per-token Python.

Expert weights come stacked (``w1_EDF`` etc.). When they have
``requires_grad=False`` (SoME's frozen experts) autograd builds no weight
gradients, only the input gradient. Weights stored in bf16 are computed in
bf16 and the result is cast back to the input dtype.

Why a loop over experts and not one padded ``bmm``: forward+backward (input
gradient only), fp32, T=4096, d=256, E=64, k=4, d_ffn=512, on the 2 shared CPU
cores of the dev box at a quiet moment (``python -c "from
somoe.models.dispatch import benchmark; benchmark()"``; skewed = Zipf-like
usage, the busiest expert gets 3762 of 16384 slots):

    routing    threads   loop (this module)   padded bmm
    balanced      2            129 ms            169 ms
    skewed        2            127 ms           2000 ms
    balanced      1            211 ms            283 ms
    skewed        1            205 ms           3733 ms

The padded form pads every expert to the busiest expert's count, so its cost
grows with routing imbalance (SoME runs reach usage Gini 0.98); the loop's
does not. ``torch._grouped_mm`` would avoid both, but on CPU (torch 2.13) its
backward fails, so it is not used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

# grouped expert function: (x_SD sorted by expert, counts per expert) -> y_SD in the same order
GroupedFn = Callable[[torch.Tensor, list[int]], torch.Tensor]


@dataclass
class Plan:
    """Where each token slot goes: the permutation that sorts slots by expert."""

    order_S: torch.Tensor  # slot index (into the flattened T*K slots) at each sorted position
    token_S: torch.Tensor  # token index at each sorted position
    expert_S: torch.Tensor  # expert id at each sorted position (non-decreasing)
    counts: list[int]  # slots per expert, length E (one host sync)


def plan(expert_idx_TK: torch.Tensor, num_experts: int) -> Plan:
    """Sort the flattened slots by expert id (stable) and count slots per expert."""
    flat_S = expert_idx_TK.reshape(-1)
    order_S = torch.argsort(flat_S, stable=True)
    counts = torch.bincount(flat_S, minlength=num_experts).tolist()
    return Plan(order_S, order_S // expert_idx_TK.shape[1], flat_S[order_S], counts)


def dispatch(x_TD: torch.Tensor, expert_idx_TK: torch.Tensor, gates_TK: torch.Tensor,
             expert_fn: GroupedFn, num_experts: int, compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``y_t = sum_j gates_tj * Expert_{idx_tj}(x_t)`` for every token, dropless.

    ``expert_fn(x_SD, counts)`` receives the token copies sorted by expert
    (``counts[e]`` consecutive rows for expert ``e``) and returns their outputs
    in the same order (see :func:`grouped_mlp`, :func:`per_expert`). With
    ``compute_dtype`` the T tokens are cast before being copied K times.
    """
    T, K = expert_idx_TK.shape
    p = plan(expert_idx_TK, num_experts)
    x_SD = x_TD.to(compute_dtype or x_TD.dtype).index_select(0, p.token_S)
    y_SD = expert_fn(x_SD, p.counts)
    inverse_S = torch.empty_like(p.order_S)
    inverse_S[p.order_S] = torch.arange(p.order_S.numel(), device=p.order_S.device)
    y_TKD = y_SD.index_select(0, inverse_S).view(T, K, -1)  # back to (token, slot) order
    # the weighted sum as one bmm: fp32 accumulation inside, rounded once to the experts' dtype
    # (no T x K x D fp32 temporaries, which cost more than the sum itself on CPU)
    y_TD = torch.bmm(gates_TK.to(y_TKD.dtype).unsqueeze(1), y_TKD).squeeze(1)
    return y_TD.to(x_TD.dtype)


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


def per_expert(fn: Callable[[int, torch.Tensor], torch.Tensor]) -> GroupedFn:
    """Adapt ``fn(e, x_slice) -> y_slice`` to the grouped form (empty experts skipped)."""

    def grouped(x_SD: torch.Tensor, counts: list[int]) -> torch.Tensor:
        # one split (its backward is one cat), not E slices (each slice's backward zero-fills all of x_SD)
        outs = [fn(e, x_nD) for e, x_nD in enumerate(x_SD.split(counts)) if counts[e]]
        return torch.cat(outs) if outs else x_SD.new_zeros(0, x_SD.shape[1])

    return grouped


@dataclass
class LoRA:
    """Per-expert low-rank adapters: ``W1 + scale * A1 @ B1``, ``W2 + scale * A2 @ B2``."""

    a1_EDR: torch.Tensor
    b1_ERF: torch.Tensor
    a2_EFR: torch.Tensor
    b2_ERD: torch.Tensor
    scale: float


def grouped_mlp(x_SD: torch.Tensor, counts: list[int], w1_EDF: torch.Tensor, b1_EF: torch.Tensor | None,
                w2_EFD: torch.Tensor, b2_ED: torch.Tensor | None, lora: LoRA | None = None,
                activation: Callable[[torch.Tensor], torch.Tensor] = F.gelu) -> torch.Tensor:
    """``act(x W1_e + b1_e) W2_e + b2_e`` on each expert's contiguous slice of ``x_SD``.

    Computes in the weights' dtype (bf16 storage means bf16 compute), or in
    the autocast dtype inside autocast, and returns that dtype; :func:`dispatch`
    casts back. Stacked tensors are
    ``unbind``-ed once so that trainable ones (LoRA, MoE experts) get one
    gradient buffer, not one full-size zero tensor per expert.
    """
    # cast once for all experts (autocast would cast every expert's weights and slice on its own)
    dt = compute_dtype(x_SD, w1_EDF.dtype)
    x_SD, w1_EDF, w2_EFD = x_SD.to(dt), w1_EDF.to(dt), w2_EFD.to(dt)
    w1s, w2s = w1_EDF.unbind(0), w2_EFD.unbind(0)
    b1s = b1_EF.to(dt).unbind(0) if b1_EF is not None else None
    b2s = b2_ED.to(dt).unbind(0) if b2_ED is not None else None
    ad = [t.to(dt).unbind(0) for t in (lora.a1_EDR, lora.b1_ERF, lora.a2_EFR, lora.b2_ERD)] if lora else None

    def expert(e: int, x: torch.Tensor) -> torch.Tensor:
        h = torch.addmm(b1s[e], x, w1s[e]) if b1s is not None else x @ w1s[e]
        if ad is not None:
            h = h + lora.scale * ((x @ ad[0][e]) @ ad[1][e])
        h = activation(h)
        y = torch.addmm(b2s[e], h, w2s[e]) if b2s is not None else h @ w2s[e]
        if ad is not None:
            y = y + lora.scale * ((h @ ad[2][e]) @ ad[3][e])
        return y

    return per_expert(expert)(x_SD, counts)


def grouped_swiglu(x_SD: torch.Tensor, counts: list[int], w_gate_EDF: torch.Tensor, w_up_EDF: torch.Tensor,
                   w_down_EFD: torch.Tensor) -> torch.Tensor:
    """SwiGLU experts (smollm backbone, no biases): ``(silu(x Wg_e) * (x Wu_e)) Wd_e`` per slice.

    Same dtype rules and single ``unbind`` as :func:`grouped_mlp`.
    """
    dt = compute_dtype(x_SD, w_up_EDF.dtype)
    x_SD = x_SD.to(dt)
    wgs, wus, wds = (w.to(dt).unbind(0) for w in (w_gate_EDF, w_up_EDF, w_down_EFD))

    def expert(e: int, x: torch.Tensor) -> torch.Tensor:
        return (F.silu(x @ wgs[e]) * (x @ wus[e])) @ wds[e]

    return per_expert(expert)(x_SD, counts)


def padded_bmm_mlp(x_SD: torch.Tensor, counts: list[int], w1_EDF: torch.Tensor, b1_EF: torch.Tensor,
                   w2_EFD: torch.Tensor, b2_ED: torch.Tensor) -> torch.Tensor:
    """The alternative measured above: pad every expert to the largest count, two ``baddbmm``."""
    E, cap = len(counts), max(counts)
    counts_E = torch.tensor(counts, device=x_SD.device)
    expert_S = torch.repeat_interleave(torch.arange(E, device=x_SD.device), counts_E)
    offsets_E = torch.cumsum(counts_E, 0) - counts_E
    rank_S = torch.arange(x_SD.shape[0], device=x_SD.device) - offsets_E[expert_S]
    buf_ECD = x_SD.new_zeros(E, cap, x_SD.shape[1]).index_put((expert_S, rank_S), x_SD)
    h_ECF = F.gelu(torch.baddbmm(b1_EF.unsqueeze(1), buf_ECD, w1_EDF))
    y_ECD = torch.baddbmm(b2_ED.unsqueeze(1), h_ECF, w2_EFD)
    return y_ECD[expert_S, rank_S]


def benchmark(T: int = 4096, D: int = 256, E: int = 64, K: int = 4, F_: int = 512, reps: int = 5) -> None:
    """Print forward+backward milliseconds of the loop vs the padded bmm (balanced and skewed routing)."""
    import time

    g = torch.Generator().manual_seed(0)
    w1, w2 = torch.randn(E, D, F_, generator=g) / D ** 0.5, torch.randn(E, F_, D, generator=g) / F_ ** 0.5
    b1, b2 = torch.zeros(E, F_), torch.zeros(E, D)
    skew_E = torch.arange(1, E + 1, dtype=torch.float).pow(-1.5)  # Zipf-like usage
    for name, weights_E in (("balanced", torch.ones(E)), ("skewed", skew_E)):
        idx_TK = torch.stack([torch.multinomial(weights_E, K, generator=g) for _ in range(T)])
        gates_TK = torch.softmax(torch.randn(T, K, generator=g), -1)
        x_TD = torch.randn(T, D, generator=g, requires_grad=True)
        fns = {"loop": lambda x, c: grouped_mlp(x, c, w1, b1, w2, b2),
               "padded_bmm": lambda x, c: padded_bmm_mlp(x, c, w1, b1, w2, b2)}
        for fn_name, fn in fns.items():
            dispatch(x_TD, idx_TK, gates_TK, fn, E).sum().backward()  # warm-up
            t0 = time.perf_counter()
            for _ in range(reps):
                dispatch(x_TD, idx_TK, gates_TK, fn, E).sum().backward()
            ms = (time.perf_counter() - t0) / reps * 1e3
            print(f"{name:9s} {fn_name:10s} {ms:8.1f} ms  (max slots/expert "
                  f"{int(torch.bincount(idx_TK.flatten(), minlength=E).max())}, threads {torch.get_num_threads()})")


if __name__ == "__main__":
    benchmark()
