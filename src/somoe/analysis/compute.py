"""Validation figures against training compute: FLOPs counted from a run's config (``bench/flops``), so
models of different cost per token compare at equal compute, not only at equal tokens."""

from __future__ import annotations

import math
from pathlib import Path

from ..report.summary import read_metrics


def train_flops_per_token(run_dir: Path) -> float | None:
    """Forward+backward model FLOPs per training token of a run (None when its config cannot be read)."""
    from ..bench.train import model_flops
    from ..config import ConfigError
    from ..train.checkpoint import CheckpointError, load_config_from

    try:
        cfg = load_config_from(run_dir)
    except (CheckpointError, ConfigError, OSError):
        return None
    seq = cfg.data.seq_len
    return model_flops(cfg.model, 1, seq, backward=True) / seq


def bpb_against_flops(run_dir: Path) -> tuple[list[float], list[float]]:
    """(training FLOPs at each eval, validation bpb there)."""
    per_token = train_flops_per_token(run_dir)
    if per_token is None:
        return [], []
    evals = [r for r in read_metrics(run_dir)[1] if r.get("val_bpb") is not None]
    return [r["tokens"] * per_token for r in evals], [r["val_bpb"] for r in evals]


def bpb_at_flops(flops: list[float], bpb: list[float], budget: float) -> float | None:
    """Validation bpb at ``budget`` training FLOPs, linear in log FLOPs between the two evals around it
    (None outside the run)."""
    points = sorted(zip(flops, bpb))
    for (f0, b0), (f1, b1) in zip(points, points[1:]):
        if f0 <= budget <= f1:
            t = 0.0 if f1 == f0 else (math.log(budget) - math.log(f0)) / (math.log(f1) - math.log(f0))
            return b0 + t * (b1 - b0)
    if points and math.isclose(points[-1][0], budget, rel_tol=1e-9):
        return points[-1][1]
    return None


def equal_compute_line(run_dirs: list[Path], labels: list[str]) -> str | None:
    """One line: each run's validation bpb at the largest training compute every run reached."""
    curves = {label: bpb_against_flops(run) for run, label in zip(run_dirs, labels)}
    if any(not flops for flops, _ in curves.values()):
        return None
    budget = min(max(flops) for flops, _ in curves.values())
    at = {label: bpb_at_flops(*curves[label], budget) for label in labels}
    if any(v is None for v in at.values()):  # the budget lies before a run's first eval
        return None
    figures = ", ".join(f"{label} {value:.4f}" for label, value in at.items())
    return f"at equal training compute ({budget:.3g} FLOPs, the smallest run's total): validation bpb {figures}"
