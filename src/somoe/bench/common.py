"""Interleaved timing, matmul ceiling, ratios and the human table shared by the benches."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

# transformers rows are skipped (with this note) when the optional extra is missing
HF_MISSING = "transformers not installed (pip install 'somoe[bench]'): its rows are skipped"


def hf_available() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fns: dict[str, Callable[[], object]], reps: int, device: torch.device,
            warmup: int = 1, notes: list[str] | None = None) -> dict[str, dict[str, float]]:
    """Median wall and process-CPU milliseconds of each callable, run round-robin.

    Interleaving puts every implementation under the same background load
    (the dev box's cores are shared); the median drops one-off stalls. With
    ``notes``, a callable that raises during warm-up is dropped (and named
    there) instead of ending the whole benchmark: e.g. a transformers kernel
    that this device or dtype lacks.
    """
    fns = dict(fns)
    for name, fn in list(fns.items()):
        try:
            for _ in range(warmup):
                fn()
        except Exception as err:  # noqa: BLE001 - reported, the other implementations still run
            if notes is None:
                raise
            notes.append(f"{name}: skipped, its warm-up raised {type(err).__name__}: {str(err)[:200]}")
            del fns[name]
    sync(device)
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            sync(device)
            wall[name].append((time.perf_counter() - w0) * 1e3)
            cpu[name].append((time.process_time() - c0) * 1e3)
    return {k: {"ms": statistics.median(wall[k]), "cpu_ms": statistics.median(cpu[k])} for k in fns}


def matmul_ceiling(device: torch.device, dtype: str, n: int | None = None, reps: int = 10) -> float:
    """FLOP/s of the fastest of ``reps`` ``n x n @ n x n`` matmuls in ``dtype``: the machine's own ceiling.

    n defaults to 1024 on CPU and 8192 on a GPU (1024 leaves a GPU's tensor cores mostly idle).
    The fastest, not the median: measured first thing in a process, the median of 5 once came out
    at half the usual figure on the dev box (thread-pool start-up), and ``mfu`` read 1.5.
    """
    n = n or (8192 if device.type == "cuda" else 1024)
    tdt = torch.bfloat16 if dtype == "bf16" else torch.float32
    a = torch.randn(n, n, device=device, dtype=tdt)
    b = torch.randn(n, n, device=device, dtype=tdt)
    for _ in range(3):
        a @ b
    sync(device)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def add_ratios(rows: list[dict], reference: str, keys: tuple[str, ...], field: str = "ms") -> None:
    """Set ``reference`` and ``ratio`` on every row: its ``field`` over the reference row's with equal ``keys``.

    For times (``ms``) ratio < 1 means faster than the reference; for rates
    (``tokens_per_s``) ratio > 1 means faster.
    """
    refs = {tuple(r[k] for k in keys): r for r in rows if r["impl"] == reference}
    for r in rows:
        ref = refs.get(tuple(r[k] for k in keys))
        if ref is None or not ref.get(field):
            continue
        r["reference"] = reference
        r["ratio"] = r[field] / ref[field]


def add_mfu(rows: list[dict], ceilings: dict[str, float], seconds_field: str = "ms") -> None:
    """Achieved model FLOP/s (``flops`` per call / time) and its fraction of the dtype's matmul ceiling."""
    for r in rows:
        if r.get("flops") and r.get(seconds_field):
            r["flop_s"] = r["flops"] / (r[seconds_field] / 1e3)
            r["ceiling_flop_s"] = ceilings[r["dtype"]]
            r["mfu"] = r["flop_s"] / r["ceiling_flop_s"]


def table(rows: list[dict], columns: list[str]) -> str:
    """Fixed-width text table of ``columns`` (missing values blank)."""

    def fmt(v) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.3e}"
        return "" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)
