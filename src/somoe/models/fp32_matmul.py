"""fp32 matmuls that stay fp32 where the run lets cuBLAS use TF32 (``train/runtime.py`` enables it on
GPUs of compute capability >= 8.0).

TF32 keeps 10 mantissa bits of each operand (~1e-3 relative), enough for training's fp32 matmuls but
not for the SoME router, which is kept in fp32 so that near-tied top-k choices do not flip, nor for
the key statistics the self-organizing rules learn from. A process-wide switch cannot be flipped for
a few ops inside a compiled graph, so these matmuls split each operand into a TF32-exact high part
and the remainder and sum three TF32 products (``a_hi b_hi + a_hi b_lo + a_lo b_hi``): ~2^-21
relative error, for three small matmuls (T x d x d and T x d x E per layer). Where fp32 matmuls are
exact anyway (the CPU, TF32 off) they are one plain matmul.

Gradients flow through the low parts (the high parts are detached bit masks): ``dA = dY b_hi^T``,
``dB = a_hi^T dY``, TF32-accurate, as every other gradient of the run.
"""

from __future__ import annotations

import torch
from torch import nn

_TF32_MASK = -(1 << 13)  # int32 0xFFFFE000: keeps sign, exponent and the top 10 of fp32's 23 mantissa bits


def tf32_matmuls(device: torch.device) -> bool:
    """Whether fp32 matmuls on ``device`` may run on TF32 tensor cores."""
    return device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32


def _split(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    hi = (t.detach().contiguous().view(torch.int32) & _TF32_MASK).view(torch.float32)
    return hi, t - hi


def mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` (2-d or batched) at fp32 accuracy for fp32 operands, whatever the TF32 setting."""
    if a.dtype != torch.float32 or b.dtype != torch.float32 or not tf32_matmuls(a.device):
        return a @ b
    a_hi, a_lo = _split(a)
    b_hi, b_lo = _split(b)
    return a_hi @ b_hi + (a_hi @ b_lo + a_lo @ b_hi)


def addmm_(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``out += a @ b`` through :func:`mm` (in place, one fused op where no split is needed)."""
    if a.dtype != torch.float32 or not tf32_matmuls(a.device):
        return out.addmm_(a, b)
    return out.add_(mm(a, b))


def linear(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    """``layer(x)`` through :func:`mm`."""
    y = mm(x, layer.weight.t())
    return y if layer.bias is None else y + layer.bias


def apply(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``net(x)`` for a Linear or a Sequential of Linears and elementwise modules, its Linears through
    :func:`mm`; other modules as they are."""
    if isinstance(net, nn.Linear):
        return linear(x, net)
    if isinstance(net, nn.Sequential):
        for module in net:
            x = apply(module, x)
        return x
    return net(x)


__all__ = ["addmm_", "apply", "linear", "mm", "tf32_matmuls"]
