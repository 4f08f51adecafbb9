"""Why the CPU expert loop buckets bf16 matmul rows and runs its activations on ATen's kernels
(models/dispatch.py: ROW_BUCKET, _aten_kernels): oneDNN builds a kernel for every new shape.

Times 128 expert-sized calls with a new random row count each, with the same row count each, and
with random counts rounded up to 32, in fp32 and bf16: ``addmm`` (MKL in fp32, oneDNN in bf16), and
exact GELU forward and backward, which ATen sends to oneDNN unless oneDNN is switched off.

    python scripts/onednn_shapes.py          # ms per 128 calls, median of 5 rounds
"""

from __future__ import annotations

import random
import statistics
import time

import torch
import torch.nn.functional as F

E, D, F_, BUCKET = 128, 128, 128, 32


def rounds(op, rows_of, dtype: torch.dtype, reps: int = 5, onednn: bool = True) -> float:
    x = torch.randn(E * 1024, D).to(dtype)
    w, b = torch.randn(E, D, F_).to(dtype), torch.randn(E, F_).to(dtype)
    times = []
    torch.backends.mkldnn.enabled = onednn
    try:
        for rep in range(reps + 1):
            t0 = time.perf_counter()
            for e in range(E):
                op(x[: rows_of()], w[e], b[e])
            if rep:  # the first round warms up
                times.append((time.perf_counter() - t0) * 1e3)
    finally:
        torch.backends.mkldnn.enabled = True
    return statistics.median(times)


OPS = {
    "addmm": lambda x, w, b: torch.addmm(b, x, w),
    "gelu": lambda x, w, b: F.gelu(x),
    "gelu_backward": lambda x, w, b: torch.ops.aten.gelu_backward(x, x),
}


def main() -> None:
    rng = random.Random(0)
    shapes = {"random rows (300-700)": lambda: rng.randint(300, 700), "fixed rows (512)": lambda: 512,
              f"random rows rounded up to {BUCKET}": lambda: -(-rng.randint(300, 700) // BUCKET) * BUCKET}
    for op_name, op in OPS.items():
        for onednn in ((True,) if op_name == "addmm" else (True, False)):
            kernels = "" if op_name == "addmm" else (" (oneDNN)" if onednn else " (ATen)")
            for dtype in (torch.float32, torch.bfloat16):
                for name, rows_of in shapes.items():
                    ms = rounds(op, rows_of, dtype, onednn=onednn)
                    print(f"{op_name + kernels:24} {str(dtype):15} {name:34} {ms:7.1f} ms / {E} calls")


if __name__ == "__main__":
    main()
