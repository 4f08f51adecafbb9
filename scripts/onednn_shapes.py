"""Why CPU bf16 expert matmuls are bucketed (models/dispatch.py, ROW_BUCKET): oneDNN builds a kernel
for every new matmul shape. Times 128 expert-sized ``addmm`` calls with a new random row count each,
with the same row count each, and with random counts rounded up to 32, in fp32 (MKL) and bf16 (oneDNN).

    python scripts/onednn_shapes.py          # ms per 128 calls, median of 5 rounds
"""

from __future__ import annotations

import random
import statistics
import time

import torch

E, D, F, BUCKET = 128, 128, 128, 32


def rounds(rows_of, dtype: torch.dtype, reps: int = 5) -> float:
    x = torch.randn(E * 1024, D).to(dtype)
    w, b = torch.randn(E, D, F).to(dtype), torch.randn(E, F).to(dtype)
    times = []
    for rep in range(reps + 1):
        t0 = time.perf_counter()
        for e in range(E):
            torch.addmm(b[e], x[: rows_of()], w[e])
        if rep:  # the first round warms up
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> None:
    rng = random.Random(0)
    shapes = {"random rows (300-700)": lambda: rng.randint(300, 700), "fixed rows (512)": lambda: 512,
              f"random rows rounded up to {BUCKET}": lambda: -(-rng.randint(300, 700) // BUCKET) * BUCKET}
    for dtype in (torch.float32, torch.bfloat16):
        for name, rows_of in shapes.items():
            print(f"{str(dtype):15} {name:34} {rounds(rows_of, dtype):7.1f} ms / {E} calls")


if __name__ == "__main__":
    main()
