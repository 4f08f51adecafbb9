"""``somoe bench compile``: graph breaks, compiles and compile time of a preset's training step.

``scope="step"`` (the default) compiles the whole step as ``train.compile=step`` runs it (forward,
backward, clipping, key rules, tallies, AdamW: train/step.py); ``scope="model"`` compiles the model
alone (``train.compile=true``), the forward and backward. Either is driven as the trainer drives it:
``set_progress`` before every step (so top-k warm-up changes k and the noise starts), the key rules
every step, an eval forward in the middle (the train/eval switch), and a reload of the model's own
state (what a resume does). ``recompiles`` counts the training frames compiled after the first step.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

from ..config import load_config
from ..models import IGNORE_INDEX, build_model
from ..train.optim import build_optimizer
from ..train.runtime import autocast_factory
from ..train.step import CompiledStep


def _batch(step: int, batch: int, seq: int, vocab: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids; the second half of every other row is padding (ignored targets), as ``data.mode: padded``."""
    g = torch.Generator().manual_seed(step)
    x = torch.randint(3, vocab, (batch, seq), generator=g)
    y = torch.randint(3, vocab, (batch, seq), generator=g)
    y[::2, seq // 2:] = IGNORE_INDEX
    return x.to(device), y.to(device)


def compile_report(preset: str, steps: int = 6, overrides: tuple[str, ...] = (), backend: str = "inductor",
                   dtype: str = "bf16", device: str = "cpu", fullgraph: bool = False, scope: str = "step") -> dict:
    """One row: ``graph_breaks`` (dynamo's count), ``train_compiles`` / ``eval_compiles`` (frames),
    ``recompiles`` (training frames after step 0), ``compile_s`` (the first step's time over the
    median step's), ``step_ms`` (median of the steps after the first)."""
    if scope == "step":
        return _step_report(preset, steps, overrides, backend, dtype, device, fullgraph)
    cfg = load_config(preset=preset, overrides=list(overrides))
    dev = torch.device(device)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, dev).train()
    amp = autocast_factory(dtype, dev)
    torch._dynamo.reset()
    counters.clear()
    frames = CompileCounterWithBackend(backend)
    compiled = torch.compile(model, backend=frames, fullgraph=fullgraph)
    batch, seq = min(cfg.train.batch_size, 8), cfg.data.seq_len
    train_frames, eval_frames, times = [], 0, []
    for step in range(steps):
        model.set_progress(step, steps)
        x, y = _batch(step, batch, seq, cfg.model.vocab_size, dev)
        t0 = time.perf_counter()
        with amp():
            loss = compiled(x, y).loss
        loss.backward()
        times.append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
        for layer in model.self_organizing_layers():
            layer.self_organize(step, steps)
        train_frames.append(frames.frame_count)
        if step == steps // 2:  # the train/eval switch, then a resume's reload of the model state
            before = frames.frame_count
            model.eval()
            with torch.no_grad(), amp():
                compiled(x, y)
            model.train()
            eval_frames = frames.frame_count - before
            model.load_state_dict(model.state_dict())
            train_frames[-1] = frames.frame_count - eval_frames
    return _row(preset, "model", backend, dtype, steps, fullgraph, train_frames[0], eval_frames,
                frames.frame_count - eval_frames - train_frames[0], times)


def _step_report(preset: str, steps: int, overrides: tuple[str, ...], backend: str, dtype: str, device: str,
                 fullgraph: bool) -> dict:
    """:func:`compile_report` of the whole training step (train/step.py's CompiledStep)."""
    cfg = load_config(preset=preset, overrides=list(overrides))
    dev = torch.device(device)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, dev).train()
    optimizer = build_optimizer(model, cfg.train, dev.type, capturable=True)
    torch._dynamo.reset()
    counters.clear()
    frames = CompileCounterWithBackend(backend)
    step = CompiledStep(model, optimizer, cfg.train, dev, autocast_factory(dtype, dev), 1, backend=frames,
                        fullgraph=fullgraph)
    batch, seq = min(cfg.train.batch_size, 8), cfg.data.seq_len
    first, times = 0, []
    for i in range(steps):
        model.set_progress(i, steps)
        x, y = _batch(i, batch, seq, cfg.model.vocab_size, dev)
        t0 = time.perf_counter()
        float(step([(x, y)], i, steps, cfg.train.lr)["ce_sum"])  # waits for the step
        times.append(time.perf_counter() - t0)
        first = first or frames.frame_count
        if i == steps // 2:  # the train/eval switch (eval runs eagerly), then a resume's reload of the state
            model.eval()
            with torch.no_grad(), autocast_factory(dtype, dev)():
                model(x, y)
            model.train()
            model.load_state_dict(model.state_dict())
    return _row(preset, "step", backend, dtype, steps, fullgraph, first, 0, frames.frame_count - first, times)


def _row(preset, scope, backend, dtype, steps, fullgraph, train_compiles, eval_compiles, recompiles, times) -> dict:
    later = times[1:] or times
    return {"bench": "compile", "preset": preset, "scope": scope, "backend": backend, "dtype": dtype,
            "steps": steps, "fullgraph": fullgraph, "graph_breaks": sum(counters["graph_break"].values()),
            "train_compiles": train_compiles, "eval_compiles": eval_compiles, "recompiles": recompiles,
            "compile_s": max(times[0] - statistics.median(later), 0.0), "step_ms": statistics.median(later) * 1e3,
            "break_reasons": sorted({r for r in counters["graph_break"]})[:10]}


COLUMNS = ["preset", "scope", "backend", "dtype", "steps", "graph_breaks", "train_compiles", "eval_compiles", "recompiles",
           "compile_s", "step_ms"]
