"""``somoe bench layer``: forward+backward of one FFN layer, SoME vs MoE vs dense vs transformers.

Reference: a dense GELU FFN of width ``k * d_ffn`` (the same active
multiply-adds as k experts of width d_ffn). fp32 rows run everything in
fp32; bf16 rows store SoME's frozen experts in bf16 (``expert_dtype: bf16``)
and run the trainable parts (router, MoE experts, dense, transformers'
block) under bf16 autocast with fp32 weights, as training does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import flops
from ..train.runtime import autocast_factory
from .common import HF_MISSING, add_mfu, add_ratios, hf_available, matmul_ceiling, measure

DEFAULT_GRID = ((8, 2), (64, 4), (128, 8))
SHAPE_KEYS = ("dtype", "tokens", "d_model", "num_experts", "top_k", "d_ffn")  # rows compared with each other
QUICK_GRID = ((64, 4),)


@dataclass
class LayerShape:
    tokens: int = 4096
    d_model: int = 256
    d_ffn: int = 512
    num_experts: int = 64
    top_k: int = 4

    def fields(self) -> dict:
        return {"tokens": self.tokens, "d_model": self.d_model, "num_experts": self.num_experts,
                "top_k": self.top_k, "d_ffn": self.d_ffn}


def _model_cfg(shape: LayerShape, ffn: str, dtype: str):
    from ..config import load_config

    s = shape
    o = ["model.backbone=gpt2", "model.activation=gelu", "model.bias=true", f"model.d_model={s.d_model}",
         "model.n_heads=4", f"model.ffn={ffn}"]
    if ffn == "dense":
        o.append(f"model.d_ffn={s.top_k * s.d_ffn}")
    elif ffn == "some":
        o += [f"model.some.num_experts={s.num_experts}", f"model.some.top_k={s.top_k}",
              f"model.some.d_ffn={s.d_ffn}", f"model.some.expert_dtype={'bf16' if dtype == 'bf16' else 'fp32'}"]
    else:
        o += [f"model.moe.num_experts={s.num_experts}", f"model.moe.top_k={s.top_k}", f"model.moe.d_ffn={s.d_ffn}"]
    return load_config(preset="cpu_gpt2", overrides=o).model


def build_layers(shape: LayerShape, dtype: str, device: torch.device, with_hf: bool) -> dict[str, torch.nn.Module]:
    from ..models.ffn import build_ffn

    layers = {name: build_ffn(_model_cfg(shape, name, dtype), 0) for name in ("dense", "some", "moe")}
    if with_hf:
        for impl in HF_EXPERT_IMPLS:
            block = _mixtral_block(shape, impl)
            if block is not None:
                layers[f"transformers_mixtral_{impl}"] = block
    for layer in layers.values():
        layer.to(device).train()
        if hasattr(layer, "set_progress"):
            layer.set_progress(1, 1)  # past any top-k warmup
    return layers


# transformers' expert implementations compared against: its eager per-expert loop (the default
# outside from_pretrained) and, where this transformers version has it, its grouped-matmul kernel
HF_EXPERT_IMPLS = ("eager", "grouped_mm")


def _mixtral_block(shape: LayerShape, impl: str) -> torch.nn.Module | None:
    """transformers' ``MixtralSparseMoeBlock`` with ``impl`` experts, or None where that impl is missing."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    if impl != "eager":
        try:
            from transformers.integrations.moe import ExpertsInterface
        except ImportError:
            return None
        if impl not in ExpertsInterface():
            return None
    cfg = MixtralConfig(hidden_size=shape.d_model, intermediate_size=shape.d_ffn,
                        num_local_experts=shape.num_experts, num_experts_per_tok=shape.top_k)
    cfg._experts_implementation = impl
    return MixtralSparseMoeBlock(cfg)


def _step(layer: torch.nn.Module, x: torch.Tensor, device: torch.device, dtype: str):
    amp = autocast_factory(dtype, device)

    def run():
        x.grad = None
        with amp():
            out = layer(x)
        y = out[0] if isinstance(out, tuple) else out
        loss = y.float().sum()
        if isinstance(out, tuple) and len(out) > 1 and isinstance(out[1], torch.Tensor) and out[1].dim() == 0:
            loss = loss + out[1]  # our layers' aux loss: part of a training step
        loss.backward()

    return run


def layer_flops(impl: str, s: LayerShape) -> int:
    if impl == "dense":
        return flops.dense_ffn(s.tokens, s.d_model, s.top_k * s.d_ffn)
    if impl == "some":
        return flops.some_layer(s.tokens, s.d_model, s.num_experts, s.top_k, s.d_ffn)
    return flops.moe_layer(s.tokens, s.d_model, s.num_experts, s.top_k, s.d_ffn, gated=impl.startswith("transformers"))


def bench_layer(grid=DEFAULT_GRID, dtypes=("fp32", "bf16"), tokens: int = 4096, d_model: int = 256,
                d_ffn: int = 512, reps: int = 5, device: str = "cpu", notes: list[str] | None = None) -> list[dict]:
    """One row per (E, k, dtype, impl); ``ratio`` is ms over the dense row's ms of the same shape and dtype."""
    dev = torch.device(device)
    with_hf = hf_available()
    if not with_hf and notes is not None:
        notes.append(HF_MISSING)
    rows: list[dict] = []
    ceilings = {dt: matmul_ceiling(dev, dt) for dt in dtypes}
    for E, k in grid:
        shape = LayerShape(tokens, d_model, d_ffn, E, k)
        for dtype in dtypes:
            layers = build_layers(shape, dtype, dev, with_hf)
            x = torch.randn(1, tokens, d_model, device=dev, requires_grad=True)
            times = measure({name: _step(layer, x, dev, dtype) for name, layer in layers.items()}, reps, dev,
                            notes=notes)
            for name, t in times.items():
                rows.append({"bench": "layer", "impl": name, "dtype": dtype, **shape.fields(), **t,
                             "flops": layer_flops(name, shape), "threads": torch.get_num_threads(),
                             "device": dev.type})
    add_ratios(rows, "dense", SHAPE_KEYS)
    _speedup_vs_transformers(rows)
    add_mfu(rows, ceilings)
    return rows


def _speedup_vs_transformers(rows: list[dict]) -> None:
    """``speedup_vs_transformers`` on our rows: the fastest transformers block's ms / ours, same
    shape and dtype (``transformers_reference`` names which implementation that was)."""
    fastest: dict[tuple, dict] = {}
    for r in rows:
        k = tuple(r[f] for f in SHAPE_KEYS)
        if r["impl"].startswith("transformers") and (k not in fastest or r["ms"] < fastest[k]["ms"]):
            fastest[k] = r
    for r in rows:
        ref = fastest.get(tuple(r[k] for k in SHAPE_KEYS))
        if ref is not None and r["impl"] in ("some", "moe"):
            r["speedup_vs_transformers"] = ref["ms"] / r["ms"]
            r["transformers_reference"] = ref["impl"]


COLUMNS = ["impl", "dtype", "num_experts", "top_k", "tokens", "d_model", "d_ffn", "ms", "cpu_ms", "ratio",
           "speedup_vs_transformers", "mfu"]
