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
:func:`grouped_mlp` applies them inside its autograd function); with bf16 compute on a GPU whose
grouped kernel is sync-free (compute capability 9.x or 10.x, :func:`grouped_mm_sync_free`; other GPUs
run the per-expert loop eagerly), and anywhere under :func:`static_dispatch` or ``torch.compile``
(any dtype), :class:`DeviceGroups`
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
input dtype. bf16 frozen experts on CPU (and small fp32 ones) take a padded-bmm path
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

# Tunables, read at call time through the package (``tuning.X`` in the modules) so that tests and
# scripts can patch them here.
# oneDNN (CPU bf16/fp16 matmuls) builds a kernel for every new (rows, cols, inner) shape, ~0.4 ms each:
# 10x a ~500 x 128 x 128 bf16 matmul itself on an AMX CPU (docs/performance-notes.md).
# Expert slices have a new row count at every call, so on that path rows are rounded up to a multiple
# of ROW_BUCKET: a few dozen shapes in all, cached after the first steps (fp32 goes to MKL's sgemm,
# which has no such cost).
ROW_BUCKET = 32

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
# a bmm). Groups of 4 or 16, or cuts chosen by a cost model, timed within noise of 8 on
# a 2-core CPU. The weights are gathered into that order, one temporary copy per
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
# fp32 (MKL's sgemm, no per-shape kernel cost) takes the padded path only for small experts
# (d_model * d_ffn elements at most this), where each per-expert matmul is so small that the loop's
# per-call overhead dominates and the weights' gather into group order is cheap. cpu_some (128 x 128,
# 64 slots per expert on average), forward+backward+AdamW steps alternated in one process on a
# 2-core AVX2 CPU: 191 vs 234 ms median (trained checkpoint), 197 vs 269 (three-quarters trained),
# 206 vs 233 (at initialisation). At 256 x 512 the gather costs more than the loop saves (64
# experts of 64 rows: 150 vs 60 ms a layer), so larger experts keep the loop.
FP32_PADDED_MAX_EXPERT_ELEMENTS = 128 * 256

from .activation import _ActivationOnAten, _activation_grad, _aten_kernels  # noqa: E402
from .expert_loop import _bucket, _round_up  # noqa: E402
from .grouped import _padded_layout_if_faster, grouped_mlp, grouped_swiglu  # noqa: E402
from .lora import LoRA  # noqa: E402
from .padded import PaddedLayout, padded_frozen_mlp, padded_layout  # noqa: E402
from .permute import dispatch, static_dispatch  # noqa: E402
from .plan import (SYNC_FREE_GROUPED_MM_MAJORS, Counts, DeviceGroups, GroupedFn, Groups, Plan,  # noqa: E402
                   compute_dtype, expert_counts, grouped_mm_available, grouped_mm_sync_free, host_counts,
                   per_expert, plan, slot_counts)

__all__ = ["SYNC_FREE_GROUPED_MM_MAJORS", "Counts", "DeviceGroups", "GroupedFn", "Groups", "LoRA", "PaddedLayout", "Plan", "compute_dtype", "dispatch",
           "expert_counts", "grouped_mlp", "grouped_mm_available", "grouped_mm_sync_free", "grouped_swiglu", "host_counts", "padded_frozen_mlp",
           "padded_layout", "per_expert", "plan", "slot_counts", "static_dispatch"]
