"""Device, precision and backend settings."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import platform

import torch

from ..config import ConfigError


DEVICE_FLAG = "--device "  # how the commands other than training (bench, eval, generate, scripts) take it


def resolve_device(name: str, setting: str = "train.device=") -> torch.device:
    """``auto`` picks cuda > mps > cpu; errors name the ``setting`` the value came from."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"{setting}{name!r} is not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{setting}{name} but no CUDA GPU is visible; use {setting}auto or {setting}cpu")
    return device


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto``: bf16 on CPUs with native bf16 (AMX/AVX512-bf16 make it faster) and CUDA >= 8.0, fp16 on older
    CUDA, fp32 elsewhere (an AVX2-only CPU emulates bf16 matmuls: a cpu_gpt2 step is then ~30x slower)."""
    if precision != "auto":
        if precision == "fp16" and device.type != "cuda":
            raise ConfigError("train.precision=fp16 needs CUDA (GradScaler); use bf16 or fp32 on this device")
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.get_device_capability(device)[0] >= 8 else "fp16"
    if device.type == "cpu":
        return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"
    return "fp32"


def autocast_factory(precision: str, device: torch.device):
    """A zero-argument context-manager factory for the forward passes."""
    if precision == "fp32":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return functools.partial(torch.autocast, device_type=device.type, dtype=dtype)


# Graphs a compiled model may need over one run: SoME's top-k warm-up compiles its routing frame once
# per value of k, up to top_k of them. Past dynamo's default limit of 8 a frame runs eagerly for the
# rest of the process, with one warning (tests/models/test_compile.py ramps k to 12).
RECOMPILE_LIMIT = 64


def compile_model(model: torch.nn.Module, **kwargs) -> torch.nn.Module:
    """``torch.compile(model, **kwargs)`` with room for the graphs of a run's schedules (above)."""
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, RECOMPILE_LIMIT)
    return torch.compile(model, **kwargs)


def setup_backends(device: torch.device, num_threads: int = 0) -> None:
    if num_threads > 0:
        torch.set_num_threads(num_threads)
    if device.type == "cpu":
        keep_freed_cpu_memory()
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8:
        # fp32 matmuls on TF32 tensor cores (10 mantissa bits): fp32 runs' speed. The SoME router and the
        # key statistics keep true fp32 accuracy through models/fp32_matmul.py, whatever this says.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4
KEEP_MEMORY_ENV = "SOMOE_KEEP_FREED_MEMORY"


@functools.lru_cache(maxsize=None)
def keep_freed_cpu_memory() -> bool:
    """Let glibc keep freed memory for reuse instead of handing it back to the kernel (once per process).

    PyTorch has no caching allocator on the CPU: every activation above glibc's mmap threshold
    is a fresh mapping whose pages fault in on first touch, and is unmapped again when freed.
    A cpu_some training step took 228k page faults (0.4 s of system time per 1.1 s step on the
    2-core dev box). With mmap off and no heap trimming (the heap then behaves like a caching
    allocator: its size settles at the step's peak) it takes ~17k, and the step is 13-18% (fp32)
    and 8% (bf16) faster; peak RSS grows a little (docs/benchmarks.md). Set
    ``SOMOE_KEEP_FREED_MEMORY=0`` to keep glibc's defaults; other C libraries are left alone.
    Returns whether the settings were applied.
    """
    if os.environ.get(KEEP_MEMORY_ENV, "1") == "0" or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    settings = ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 1 << 40), (_M_TOP_PAD, 64 << 20))
    return all(libc.mallopt(param, value) == 1 for param, value in settings)
