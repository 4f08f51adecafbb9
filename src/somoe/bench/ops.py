"""``somoe bench ops``: how many ATen ops one FFN layer's training step issues, per path.

Every non-view ATen call of one forward + backward (+ the routing statistics a training forward
gathers) is counted with a ``TorchDispatchMode``: on a GPU each is at least one kernel launch and
some host work, so at small widths the count, not the FLOPs, sets the step time. View ops (``view``,
``t``, ``slice``, ``detach``, ``_unsafe_view``...) alias memory and launch nothing, so they are not
counted.

Two dispatch paths are counted (``path``): ``host``, the CPU's per-expert loop (its count grows with
the number of experts), and ``device``, the GPU path (device-side offsets, one grouped matmul per expert
op, no host sync), forced on the CPU with :func:`somoe.models.dispatch.static_dispatch`.
"""

from __future__ import annotations

import collections

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ..models.dispatch import static_dispatch
from ..train.runtime import autocast_factory
from .layer import LayerShape, build_layers

PATHS = ("host", "device")
IMPLS = ("dense", "moe", "some")
DEFAULT_SHAPE = LayerShape(tokens=256, d_model=64, d_ffn=128, num_experts=64, top_k=4)
# ops that are views in all but name: they allocate nothing and launch no kernel
_VIEW_LIKE = {torch.ops.aten._unsafe_view.default}


class OpCounter(TorchDispatchMode):
    """Counts the non-view ATen ops dispatched inside the ``with`` block, by name."""

    def __init__(self):
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and func not in _VIEW_LIKE:
            self.counts[str(func).removeprefix("aten.")] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def count_step_ops(layer: torch.nn.Module, x_BTD: torch.Tensor, dtype: str = "fp32") -> OpCounter:
    """The ops of one training step of ``layer`` on ``x`` (after a warm-up step, so lazily built state
    is not counted): forward, the sum loss (+ aux loss), backward."""
    amp = autocast_factory(dtype, x_BTD.device)

    def step():
        with amp():
            y, aux = layer(x_BTD)
        loss = y.float().sum()
        (loss if aux is None else loss + aux).backward()

    step()
    for t in (x_BTD, *layer.parameters()):  # a training step starts from no gradients (zero_grad(set_to_none))
        t.grad = None
    counter = OpCounter()
    with counter:
        step()
    return counter


def bench_ops(shape: LayerShape = DEFAULT_SHAPE, dtypes=("fp32",), paths=PATHS, device: str = "cpu",
              top: int = 0) -> list[dict]:
    """One row per (impl, dtype, path): ``ops`` (total) and, with ``top``, the most frequent ops."""
    dev = torch.device(device)
    rows = []
    for dtype in dtypes:
        for path in paths:
            with static_dispatch(path == "device"):
                layers = build_layers(shape, dtype, dev, with_hf=False)
                for impl in IMPLS:
                    torch.manual_seed(0)
                    x = torch.randn(1, shape.tokens, shape.d_model, device=dev, requires_grad=True)
                    counter = count_step_ops(layers[impl], x, dtype)
                    row = {"bench": "ops", "impl": impl, "dtype": dtype, "path": path, **shape.fields(),
                           "ops": counter.total}
                    if top:
                        row["top_ops"] = dict(counter.counts.most_common(top))
                    rows.append(row)
    return rows


COLUMNS = ["impl", "dtype", "path", "num_experts", "top_k", "tokens", "d_model", "d_ffn", "ops"]
