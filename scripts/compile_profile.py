"""Where a training step's time goes, eager against ``torch.compile``, for one preset.

On an H100 (2026-11-27) a compiled seed000_gpt2 step was slower than the eager one (31.4 vs
29.0 ms, bf16: `somoe bench train --compile`, which syncs after every step and interleaves the
models) while transformers' GPT-2 gained 1.25x from compiling; profiled back to back, the compiled
step took 19.8 ms. For each variant this prints the step time synced after every step (as the
bench times it) and back to back, then the kernels that take the most device time.

    python scripts/compile_profile.py --preset seed000_gpt2 --device cuda
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from somoe.bench.common import measure, sync
from somoe.bench.train import _step
from somoe.config import load_config
from somoe.models.transformer import build_model
from somoe.train.optim import build_optimizer
from somoe.train.runtime import DEVICE_FLAG, compile_model, resolve_device, setup_backends


def top_kernels(run, device: torch.device, steps: int, rows: int) -> tuple[float, list[tuple[str, float]]]:
    """(ms per step, the ``rows`` costliest kernels as (name, ms per step)) over ``steps`` profiled steps."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            run()
        sync(device)
        per_step = (time.perf_counter() - t0) * 1e3 / steps
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)[:rows]
    return per_step, [(e.key[:70], getattr(e, key) / 1e3 / steps) for e in events]


def step_times(run, device: torch.device, steps: int) -> tuple[float, float]:
    """(median ms of a step synced after each, as the bench times it; mean ms of ``steps`` steps run
    back to back)."""
    synced = measure({"step": run}, steps, device, warmup=0)["step"]["ms"]
    t0 = time.perf_counter()
    for _ in range(steps):
        run()
    sync(device)
    return synced, (time.perf_counter() - t0) * 1e3 / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="seed000_gpt2")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rows", type=int, default=14)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    device = resolve_device(args.device, setting=DEVICE_FLAG)
    setup_backends(device)
    cfg = load_config(preset=args.preset, overrides=args.overrides)
    B, T = cfg.train.batch_size, cfg.data.seq_len
    x = torch.randint(0, cfg.model.vocab_size, (B, T), device=device)
    for label, wrap in (("eager", lambda m: m), ("compiled", compile_model)):
        torch.manual_seed(0)
        model = build_model(cfg.model, device).train()
        wrapped = wrap(model)
        run = _step(lambda: wrapped(x, x).loss, model, build_optimizer(model, cfg.train, device.type), "bf16", device)
        for _ in range(3):  # compilation and autotuning happen here
            run()
        synced, back_to_back = step_times(run, device, 10)
        ms, kernels = top_kernels(run, device, args.steps, args.rows)
        print(f"== {args.preset} {label}: {synced:.2f} ms per step synced, {back_to_back:.2f} back to back, "
              f"{ms:.2f} profiled")
        for name, k_ms in kernels:
            print(f"  {k_ms:8.3f} ms  {name}")


if __name__ == "__main__":
    main()
