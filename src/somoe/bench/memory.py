"""``somoe bench memory``: where a preset's bytes go, and whether a CPU step fits.

Parameters (trainable fp32; SoME's frozen experts in ``expert_dtype``, as
buffers), gradients and AdamW state (trainable parameters only: the
optimizer is built by the trainer's ``build_optimizer`` and checked to hold
no frozen expert), the checkpoint's tensors (frozen experts only with
``save_experts: weights``), and, with ``measure``, one real forward+backward
at ``batch`` sequences: bytes saved for backward (activations, excluding
weights) and the process's peak resident memory.
"""

from __future__ import annotations

import resource
import sys

import torch

GIB = 1024 ** 3


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _is_expert(name: str) -> bool:
    return ".expert_w" in name or ".expert_b" in name


def _expert_buffers(model) -> list[torch.Tensor]:
    return [b for name, b in model.named_buffers() if _is_expert(name)]


def memory_report(preset: str, batch: int = 1, seq_len: int | None = None, measure: bool = True,
                  overrides: tuple[str, ...] = (), budget_gib: float = 24.0) -> dict:
    """One row for ``preset``; sizes in bytes. Without ``measure`` the model is built on the meta device."""
    from ..config import load_config
    from ..models.transformer import build_model
    from ..train.optim import build_optimizer

    cfg = load_config(preset=preset, overrides=list(overrides))
    T = seq_len or cfg.data.seq_len
    model = build_model(cfg.model, "cpu" if measure else "meta")
    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen = _expert_buffers(model)
    optimizer = build_optimizer(model, cfg.train, "cpu")
    in_optimizer = [p for g in optimizer.param_groups for p in g["params"]]
    frozen_ids = {id(b) for b in frozen}
    state = model.state_dict()
    trainable_bytes = _nbytes(trainable)
    row = {
        "bench": "memory", "impl": preset, "preset": preset,
        "dtype": cfg.model.some.expert_dtype if cfg.model.ffn == "some" else "fp32",
        "batch": batch, "seq_len": T,
        "params_trainable": sum(p.numel() for p in trainable),
        "params_frozen": sum(b.numel() for b in frozen),
        "param_bytes": trainable_bytes, "frozen_bytes": _nbytes(frozen),
        "grad_bytes": trainable_bytes,
        "optimizer_state_bytes": 2 * 4 * sum(p.numel() for p in in_optimizer),  # AdamW exp_avg + exp_avg_sq, fp32
        "frozen_in_optimizer": sum(1 for p in in_optimizer if id(p) in frozen_ids),
        "checkpoint_bytes": _nbytes(state.values()),
        "frozen_in_checkpoint_bytes": _nbytes(v for k, v in state.items() if _is_expert(k)),
        "weight_ema": "none (the trainer keeps no EMA of weights; SoME's usage/key EMAs are E x d buffers)",
    }
    if measure:
        row.update(_measure_step(model, cfg, batch, T))
        row["fits_budget"] = row["rss_peak_bytes"] < budget_gib * GIB
        row["budget_gib"] = budget_gib
    return row


def _measure_step(model, cfg, batch: int, T: int) -> dict:
    """Forward+backward (bf16 autocast when the preset's precision resolves to it) on random tokens."""
    from ..train.runtime import autocast_factory, resolve_precision

    weights = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights:
            saved[ptr] = max(saved.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    precision = resolve_precision(cfg.train.precision, torch.device("cpu"))
    x = torch.randint(0, cfg.model.vocab_size, (batch, T))
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast_factory(precision, torch.device("cpu"))():
        out = model(x, x)
    out.loss.backward()
    return {"precision": precision, "activation_saved_bytes": sum(saved.values()), "rss_peak_bytes": _peak_rss()}


def _peak_rss() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


COLUMNS = ["preset", "dtype", "batch", "seq_len", "params_trainable", "params_frozen", "param_bytes", "frozen_bytes",
           "grad_bytes", "optimizer_state_bytes", "frozen_in_optimizer", "checkpoint_bytes",
           "frozen_in_checkpoint_bytes", "activation_saved_bytes", "rss_peak_bytes", "fits_budget"]
