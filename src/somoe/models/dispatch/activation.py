"""Expert activations and their gradients on ATen's own CPU kernels (oneDNN builds one per shape)."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


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
    (docs/performance-notes.md), and a cpu_some fp32 step spent ~230 of ~950 ms
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
