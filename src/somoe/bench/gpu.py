"""``somoe bench gpu``: whole training steps of the seed presets at full size, in three modes, with MFU.

Modes: ``eager``; ``compiled`` (our models: the whole training step compiled as one graph,
``train.compile=step``; transformers' model: ``torch.compile`` of the model); ``cudagraphs`` (ours: that
step replayed as one CUDA graph, ``train.cuda_graphs=true``; transformers': ``mode="reduce-overhead"``;
CUDA only). Each row reports tokens/s, MFU, peak memory and the step-time spread (p10/p50/p90 ms)
of synchronised steps after the warm-up.

MFU, written out (per optimizer step of ``B x S`` tokens, ``t`` seconds)::

    MFU = ((6 * N_trained + 4 * N_frozen) * B * S  +  12 * L * d * S * B * S) / (t * peak_bf16)

``N_trained``: the trainable parameters one token's forward touches, counted as matmul weights: every
trainable parameter except position embeddings, with only the ``k`` of ``E`` routed experts of a
classic MoE; 6 FLOPs each (2 forward, 2 for the input gradient, 2 for the weight gradient).
``N_frozen``: the ``k`` of ``E`` frozen SoME experts a token routes to; 4 FLOPs each, since a frozen
weight gets no weight gradient (2 forward, 2 for the input gradient). ``12 * L * d * S`` per token:
attention's score and value products, forward and backward (PaLM, appendix B; causal masking not
discounted). ``peak_bf16``: the device's dense bf16 tensor-core peak from :data:`PEAK_BF16` by chip and
form factor (no sparsity), or on other devices the measured matmul ceiling.
"""

from __future__ import annotations

import statistics
import time

import torch

from ..models.dispatch import grouped_mm_sync_free
from .common import matmul_ceiling, sync
from .train import _step, hf_gpt2

PRESETS = ("seed000_gpt2", "seed000_some", "seed003_nanogpt_moe")
MODES = ("eager", "compiled", "cudagraphs")
# dense bf16 tensor-core peaks (FLOP/s) from the vendor's data sheets (half the "with sparsity" figure), by
# chip and form factor: PCIe and NVL cards run at lower clocks and power than the SXM part of the same chip
PEAK_BF16 = {("A100", "SXM"): 312e12, ("A100", "PCIe"): 312e12,
             ("H100", "SXM"): 989e12, ("H100", "PCIe"): 756e12, ("H100", "NVL"): 835e12,
             ("H200", "SXM"): 989e12, ("H200", "NVL"): 835e12}


def datasheet_peak(name: str) -> tuple[float, str] | None:
    """(dense bf16 peak, its label) for a CUDA device name, e.g. ``NVIDIA H100 PCIe`` -> 756 TFLOP/s; the
    SXM part where the name says neither PCIe nor NVL (``NVIDIA H100 80GB HBM3``); None for other chips."""
    upper = name.upper()
    form = "NVL" if "NVL" in upper else "PCIe" if "PCIE" in upper else "SXM"
    for chip in ("A100", "H100", "H200"):
        if chip in upper and (chip, form) in PEAK_BF16:
            return PEAK_BF16[(chip, form)], f"datasheet {chip} {form}"
    return None


def device_peak(device: torch.device) -> tuple[float, str]:
    """(dense bf16 peak FLOP/s, where it came from) for ``device``."""
    if device.type == "cuda":
        known = datasheet_peak(torch.cuda.get_device_name(device))
        if known is not None:
            return known
    return matmul_ceiling(device, "bf16", n=512 if device.type == "cpu" else None), "measured matmul ceiling"


def active_params(model, cfg) -> tuple[int, int]:
    """``(N_trained, N_frozen)`` of the module docstring."""
    trained = sum(p.numel() for name, p in model.named_parameters() if p.requires_grad and "pos_emb" not in name)
    frozen = 0
    c = cfg.model
    for ffn in model.ffns():
        if c.ffn == "some":  # frozen experts are buffers: the k a token uses
            frozen += ffn.active_frozen_param_count()
        elif c.ffn == "moe":  # trainable experts were counted whole above: keep the k of E
            experts = sum(p.numel() for name, p in ffn.named_parameters() if name.startswith("expert_"))
            trained -= experts - experts * c.moe.top_k // c.moe.num_experts
    return trained, frozen


def step_flops(model, cfg, batch: int, seq: int) -> int:
    c = cfg.model
    trained, frozen = active_params(model, cfg)
    return (6 * trained + 4 * frozen) * batch * seq + 12 * c.n_layers * c.d_model * seq * batch * seq


def _compiled(model, mode: str, backend: str):
    if mode == "eager":
        return model
    if mode == "cudagraphs":
        return torch.compile(model, mode="reduce-overhead")
    return torch.compile(model, backend=backend)


def bench_gpu(presets=PRESETS, modes=MODES, steps: int = 10, warmup: int = 3, device: str = "cuda",
              overrides: tuple[str, ...] = (), backend: str = "inductor", with_hf: bool = True,
              notes: list[str] | None = None) -> list[dict]:
    """One row per (preset, mode), plus ``transformers_gpt2@seed000_gpt2`` per mode where transformers is installed."""
    from ..config import load_config
    from ..models.transformer import build_model
    from .common import hf_available

    dev = torch.device(device)
    peak, peak_source = device_peak(dev)
    rows = []
    for preset in presets:
        cfg = load_config(preset=preset, overrides=list(overrides))
        builders = {preset: lambda cfg=cfg: build_model(cfg.model, dev).train()}
        if with_hf and hf_available() and cfg.model.ffn == "dense" and cfg.model.backbone == "gpt2":
            builders[f"transformers_gpt2@{preset}"] = lambda cfg=cfg: hf_gpt2(cfg.model, dev)
        B, S = cfg.train.batch_size, cfg.data.seq_len
        for mode in modes:
            if mode == "cudagraphs" and dev.type != "cuda":
                if notes is not None:
                    notes.append(f"{preset}: cudagraphs mode skipped (needs CUDA)")
                continue
            if mode == "cudagraphs" and cfg.model.ffn != "dense" and not grouped_mm_sync_free(dev):
                if notes is not None:  # torch's grouped-matmul fallback reads offsets on the host: no capture
                    notes.append(f"{preset}: cudagraphs mode skipped (routed experts need compute capability 9.x/10.x)")
                continue
            for impl, build in builders.items():
                torch.manual_seed(0)
                model = build()
                ours = hasattr(model, "ffns")
                flops = step_flops(model, cfg, B, S) if ours else None
                x = torch.randint(0, cfg.model.vocab_size, (B, S), device=dev)
                train_step = _train_step(model, cfg, mode, backend, x, ours, dev)
                times = _time_steps(train_step, steps, warmup, dev)
                row = _row(impl, preset, mode, B, S, times, flops, peak, peak_source, dev)
                rows.append(row)
                del model, train_step
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
    return rows


def _train_step(model, cfg, mode: str, backend: str, x: torch.Tensor, ours: bool, dev: torch.device):
    """A zero-argument training step of ``mode`` (see the module docstring), past every warm-up schedule."""
    from ..train.optim import build_optimizer
    from ..train.runtime import autocast_factory
    from ..train.step import CompiledStep

    if ours:
        model.set_progress(10_000, 10_000)  # past every warm-up: the steady state
    if ours and mode != "eager":
        optimizer = build_optimizer(model, cfg.train, dev.type, capturable=True)
        step = CompiledStep(model, optimizer, cfg.train, dev, autocast_factory("bf16", dev), 1, backend=backend,
                            cuda_graphs=mode == "cudagraphs")
        host = x.cpu()  # batches come from the host, as the trainer's do (the step copies them over)
        return lambda: step([(host, host)], 10_000, 10_000, cfg.train.lr)
    run = _compiled(model, mode, backend)
    loss_fn = (lambda: run(x, x).loss) if ours else (lambda: run(input_ids=x, labels=x).loss)
    return _step(loss_fn, model, build_optimizer(model, cfg.train, dev.type), "bf16", dev)


def _time_steps(train_step, steps: int, warmup: int, dev) -> list[float]:
    """Synchronised wall seconds of ``steps`` training steps after ``warmup``."""
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    times = []
    for i in range(warmup + steps):
        sync(dev)
        t0 = time.perf_counter()
        train_step()
        sync(dev)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def _row(impl, preset, mode, B, S, times, flops, peak, peak_source, dev) -> dict:
    q = statistics.quantiles(times, n=10, method="inclusive") if len(times) >= 2 else [times[0]] * 9
    p50 = statistics.median(times)
    row = {"bench": "gpu", "impl": impl, "preset": preset, "mode": mode, "batch": B, "seq_len": S,
           "ms": p50 * 1e3, "ms_p10": q[0] * 1e3, "ms_p90": q[-1] * 1e3, "tokens_per_s": B * S / p50,
           "peak_flop_s": peak, "peak_source": peak_source, "device": dev.type}
    if dev.type == "cuda":
        row["peak_mem_gib"] = torch.cuda.max_memory_allocated(dev) / 2 ** 30
        row["device_name"] = torch.cuda.get_device_name(dev)
    if flops:
        row["flops"], row["mfu"] = flops, flops / p50 / peak
    return row


COLUMNS = ["impl", "mode", "batch", "seq_len", "ms", "ms_p10", "ms_p90", "tokens_per_s", "mfu", "peak_mem_gib"]
