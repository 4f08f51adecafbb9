"""Is the SoME layer's GPU step bound by the host or by the device? One layer shape, each implementation.

On an H100 (2026-11-27) the SoME layer's forward+backward took ~5 ms at T=4096, E=64, k=4 in bf16,
3x the dense FFN at any E, while its FLOPs take tens of microseconds there. For each implementation of
`somoe bench layer` this prints: the step synced (as the bench times it); the host's share (the time
until the Python call returns, before waiting for the device: close to the synced time means the device
waits for the host); device-busy time and kernels per step (torch.profiler); then SoME's costliest kernels.

    python scripts/layer_profile.py --device cuda            # E=64 k=4, bf16
    python scripts/layer_profile.py --device cpu --tokens 512 # a dry run of the script
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compile_profile import top_kernels  # noqa: E402  (scripts/ is not a package)

from somoe.bench.common import hf_available, sync  # noqa: E402
from somoe.bench.layer import LayerShape, _step, build_layers  # noqa: E402
from somoe.train.runtime import DEVICE_FLAG, resolve_device, setup_backends  # noqa: E402


def host_and_synced_ms(run, device: torch.device, reps: int) -> tuple[float, float]:
    """(median ms until ``run`` returns, median ms until the device has finished it)."""
    host, synced = [], []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        run()
        host.append(time.perf_counter() - t0)
        sync(device)
        synced.append(time.perf_counter() - t0)
    return statistics.median(host) * 1e3, statistics.median(synced) * 1e3


def kernels_per_step(run, device: torch.device, steps: int) -> tuple[float, float]:
    """(device-busy ms per step, kernel launches per step); on CPU, ATen ops' self time and count."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            run()
        sync(device)
    if device.type == "cuda":
        events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        busy_us = sum(e.device_time_total for e in events)
    else:
        events = [e for e in prof.events() if e.name.startswith("aten::")]
        busy_us = sum(e.self_cpu_time_total for e in events)
    return busy_us / 1e3 / steps, len(events) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--rows", type=int, default=16)
    args = ap.parse_args()
    device = resolve_device(args.device, setting=DEVICE_FLAG)
    setup_backends(device)
    shape = LayerShape(tokens=args.tokens, num_experts=args.experts, top_k=args.top_k)
    layers = build_layers(shape, "bf16", device, hf_available())
    x = torch.randn(1, shape.tokens, shape.d_model, device=device, requires_grad=True)
    print(f"layer {shape.fields()} bf16 on {device}")
    for name, layer in layers.items():
        run = _step(layer, x, device, "bf16")
        for _ in range(3):
            run()
        host, synced = host_and_synced_ms(run, device, args.reps)
        busy, launches = kernels_per_step(run, device, 3)
        print(f"{name:34} synced {synced:7.2f} ms | host {host:7.2f} ms | device busy {busy:7.2f} ms | "
              f"{launches:5.0f} kernels per step")
    ms, kernels = top_kernels(_step(layers["some"], x, device, "bf16"), device, 3, args.rows)
    print(f"== some: {ms:.2f} ms per profiled step; costliest kernels (ms per step):")
    for name, k_ms in kernels:
        print(f"  {k_ms:8.3f}  {name}")


if __name__ == "__main__":
    main()
