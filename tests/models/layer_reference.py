"""One forward+backward of a layer and of its per-token reference on the same input and upstream gradient."""

from __future__ import annotations

from typing import Callable

import torch


def run_both(layer: torch.nn.Module, reference: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
             upstream: torch.Tensor) -> tuple[tuple, tuple]:
    """``((y, dx, grads by name) of the layer, the same of the reference)``; the reference gets the input as
    ``T x d`` rows and its gradients land on the layer's own parameters."""
    out = []
    for forward in (lambda xi: layer(xi)[0], lambda xi: reference(xi.reshape(-1, x.shape[-1])).view_as(x)):
        layer.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        y = forward(xi)
        (y * upstream).sum().backward()
        out.append((y, xi.grad, {n: p.grad.clone() for n, p in layer.named_parameters()}))
    return out[0], out[1]
