"""Why bf16 frozen experts on CPU run as bmm over load-sorted groups (models/dispatch/padded.py, padded_layout).

Trains cpu_some (bf16 experts, random tokens, as ``somoe bench train`` does) for a few steps, keeps
each layer's slots per expert from the last step, then times one frozen-expert MLP forward+backward
(cpu_some's shape) at those counts: the per-expert loop; pieces of PADDED_CHUNK rows in groups of
4 / 8 (the default) / 16; whole experts in groups of 8; and one group padded to the busiest expert
(the path before the groups). ``x`` is the rows computed
(the loop's are rounded up to ROW_BUCKET per expert) over the real ones.

    python scripts/padded_groups.py              # 10 training steps first
    python scripts/padded_groups.py --steps 0    # the counts at initialisation
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import somoe.models.dispatch as dm
from somoe.bench.train import _step
from somoe.config import load_config
from somoe.models.transformer import build_model
from somoe.train.optim import build_optimizer
from somoe.train.runtime import keep_freed_cpu_memory


def layer_counts(steps: int) -> list[list[int]]:
    """Slots per expert of every SoME layer in the last of ``steps`` training steps (or one forward)."""
    cfg = load_config(preset="cpu_some", overrides=["model.some.expert_dtype=bf16"])
    torch.manual_seed(0)
    model = build_model(cfg.model, torch.device("cpu")).train()
    x = torch.randint(0, cfg.model.vocab_size, (cfg.train.batch_size, cfg.data.seq_len))
    seen: list[list[int]] = []
    layout = dm.padded_layout

    def spy(counts, *args, **kwargs):
        seen.append(list(counts))
        return layout(counts, *args, **kwargs)

    dm.grouped.padded_layout = spy  # where grouped_mlp looks it up
    try:
        step = _step(lambda: model(x, x).loss, model, build_optimizer(model, cfg.train, "cpu"), "bf16",
                     torch.device("cpu"))
        for _ in range(max(steps, 1)):
            seen.clear()
            step()
    finally:
        dm.grouped.padded_layout = layout
    return seen


def time_mlp(counts: list[int], d_model: int, d_ffn: int, reps: int) -> float:
    """Median ms of one gated frozen-expert MLP forward+backward at ``counts`` (bf16)."""
    g = torch.Generator().manual_seed(0)
    E, S = len(counts), sum(counts)
    w1 = torch.randn(E, d_model, d_ffn, generator=g).bfloat16()
    w2 = torch.randn(E, d_ffn, d_model, generator=g).bfloat16()
    b1, b2 = torch.zeros(E, d_ffn).bfloat16(), torch.zeros(E, d_model).bfloat16()
    x = torch.randn(S, d_model, generator=g).bfloat16().requires_grad_(True)
    gates, dy = torch.rand(S, generator=g).bfloat16(), torch.randn(S, d_model, generator=g).bfloat16()
    times = []
    for rep in range(reps + 2):
        x.grad = None
        t0 = time.perf_counter()
        dm.grouped_mlp(x, dm.Groups(counts, gates), w1, b1, w2, b2).backward(dy)
        if rep >= 2:  # two warm-ups: oneDNN builds its kernels for the new shapes
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--reps", type=int, default=9)
    args = ap.parse_args()
    keep_freed_cpu_memory()
    cfg = load_config(preset="cpu_some").model
    d_model, d_ffn = cfg.d_model, cfg.some.d_ffn
    all_counts = layer_counts(args.steps)
    whole = 10 ** 6  # no pieces / one group
    variants = {"loop": (0.0, dm.PADDED_GROUP, dm.PADDED_CHUNK), "groups of 4": (1e9, 4, dm.PADDED_CHUNK),
                "groups of 8": (1e9, 8, dm.PADDED_CHUNK), "groups of 16": (1e9, 16, dm.PADDED_CHUNK),
                "8, whole experts": (1e9, 8, whole), "one group": (1e9, whole, whole)}
    print(f"cpu_some expert MLP (d {d_model}, d_ffn {d_ffn}, bf16) fwd+bwd, counts after {args.steps} steps")
    print(f"{'layer':>5} {'max/mean':>8} " + " ".join(f"{name:>18}" for name in variants))
    defaults = dm.PADDED_GROUP, dm.PADDED_MAX_WASTE, dm.PADDED_CHUNK
    try:
        for i, counts in enumerate(all_counts):
            cells = []
            for waste, group, chunk in variants.values():
                dm.PADDED_MAX_WASTE, dm.PADDED_GROUP, dm.PADDED_CHUNK = waste, group, chunk
                ms = time_mlp(counts, d_model, d_ffn, args.reps)
                bucketed = sum(dm._round_up(n, dm.ROW_BUCKET) for n in counts)  # the loop's rows
                rows = (dm.padded_layout(counts, group=group, chunk=chunk).rows if waste else bucketed) / sum(counts)
                cells.append(f"{ms:8.1f} ms x{rows:4.2f}")
            print(f"{i:>5} {max(counts) * len(counts) / sum(counts):8.2f} " + " ".join(f"{c:>18}" for c in cells))
    finally:
        dm.PADDED_GROUP, dm.PADDED_MAX_WASTE, dm.PADDED_CHUNK = defaults


if __name__ == "__main__":
    main()
