"""Routing plans: slots per expert (host list or device groups), the sort of slots by expert, and
the switch between the two (:func:`grouped_mm_available`, :func:`static_dispatch` in ``permute``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple, Union

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


@torch.library.custom_op("somoe::grouped_mm", mutates_args=())
def _opaque_grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """The grouped matmul as an op ``torch.compile`` does not look into: its fake-tensor rule accepts bf16
    only (torch 2.13), so fp32 experts are traced through this wrapper (a fixed output shape, no host
    value in the graph), and the kernel runs as it does eagerly."""
    return _grouped_mm(a, b, offs=offs)


@_opaque_grouped_mm.register_fake
def _(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    if b.dim() == 3:  # rows of a times their group's matrix: (S, N)
        return a.new_empty(a.shape[0], b.shape[2])
    return a.new_empty(offs.shape[0], a.shape[0], b.shape[1])  # a^T d per group (the weight gradient): (E, K, N)


def grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """``_grouped_mm``; under ``torch.compile`` the opaque op wherever the kernel's own rule would refuse
    the tensors (anything but CUDA bf16)."""
    if torch.compiler.is_compiling() and not (a.is_cuda and a.dtype == torch.bfloat16):
        return _opaque_grouped_mm(a, b, offs)
    return _grouped_mm(a, b, offs=offs)


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


def _device_counts(counts: Counts) -> bool:
    return isinstance(counts, (torch.Tensor, DeviceGroups))


def _groups(counts: torch.Tensor | DeviceGroups, rows: int) -> DeviceGroups:
    return counts if isinstance(counts, DeviceGroups) else DeviceGroups.of(counts, rows)


# Compute capabilities (majors) where CUDA's grouped matmul runs its CUTLASS kernel: Hopper (9.x) and
# datacenter Blackwell (10.x), bf16 only (torch 2.10-2.13: ``_scaled_mm_allowed_device(sm90_only,
# sm100_only)`` in GroupedBlas.cpp). Every other GPU (A100 8.0, Ada 8.9, consumer Blackwell 12.x)
# gets torch's fallback, which reads the offsets back to the host (``offs.cpu()``) and loops over the
# groups: a host sync per call, and a failure under CUDA-graph capture.
SYNC_FREE_GROUPED_MM_MAJORS = (9, 10)


def grouped_mm_sync_free(device: torch.device) -> bool:
    """Whether ``device``'s grouped matmul (bf16) runs without reading the offsets on the host."""
    if device.type != "cuda" or _grouped_mm is None:
        return False
    return torch.cuda.get_device_capability(device)[0] in SYNC_FREE_GROUPED_MM_MAJORS


def grouped_mm_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether experts on ``device`` computing in ``dtype`` use the grouped matmul (no host sync).

    CUDA bf16 on the GPUs where the kernel is sync-free (:data:`SYNC_FREE_GROUPED_MM_MAJORS`). Other
    GPUs, fp32 and the CPU take host counts: the per-expert loop (on the CPU, bf16 frozen experts
    and small fp32 ones the padded bmm where it wins). On the CPU the op exists but loops over groups
    itself and has no backward, so the Python loop with preallocated outputs is used there.
    """
    return dtype == torch.bfloat16 and grouped_mm_sync_free(device)


class Groups(list):
    """Host counts (a ``list[int]``, so any ``expert_fn`` can ``split`` by it) that also carry
    the sorted slots' gates: an expert function that can apply them itself (:func:`grouped_mlp`,
    which then saves the ungated output and no gated copy) does so and sets ``gates_applied``
    so that :func:`dispatch` does not multiply again."""

    def __init__(self, counts: list[int], gates_S: torch.Tensor | None = None):
        super().__init__(counts)
        self.gates_S = gates_S
        self.gates_applied = False

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

def _expert_of_row(counts: torch.Tensor, rows: int) -> torch.Tensor:
    # output_size keeps repeat_interleave from reading the total back to the host
    return torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts, output_size=rows)
