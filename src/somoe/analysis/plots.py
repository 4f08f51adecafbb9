"""The PNG figures of ``somoe analyze`` (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .galaxy import CENTER_FACTOR, Clustering
from .trajectories import Trajectories


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _grid(n: int, size: float = 4.5):
    plt = pyplot()
    cols = min(n, 4)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols, size * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    return fig, list(axes.flat[:n])


def save(fig, path: Path) -> Path:
    """Lay out, write at 110 dpi, close; the figures of every analysis go through here."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path


def galaxy_plot(panels: list[tuple[str, np.ndarray, np.ndarray, Clustering]], title: str, path: Path) -> Path:
    """One scatter per panel (label, E x 2 coords, usage, clustering): size ~ usage, colour = cluster."""
    fig, axes = _grid(len(panels))
    for ax, (label, xy, usage, clustering) in zip(axes, panels):
        E = usage.size
        sizes = 12 + 400 * np.clip(usage * E, 0, None) / max(float((usage * E).max()), 1e-9)
        ax.scatter(xy[:, 0], xy[:, 1], s=sizes, c=clustering.labels, cmap="tab10", vmin=0, vmax=9,
                        alpha=0.75, edgecolors="k", linewidths=0.4)
        for e in np.argsort(-usage)[:5]:  # name the busiest experts
            ax.annotate(str(e), xy[e], fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_title(f"{label}\n{clustering.k} clusters, sizes {clustering.sizes()}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title + "  (point size = usage, colour = cluster)")
    return save(fig, path)


def trajectory_plot(trajs: list[Trajectories], labels: list[np.ndarray], title: str, path: Path) -> Path:
    """Each key's path across checkpoints (thin line), its last position (dot, coloured by final cluster)."""
    plt = pyplot()
    fig, axes = _grid(len(trajs))
    cmap = plt.get_cmap("tab10")
    for ax, tr, lab in zip(axes, trajs, labels):
        C, E, _ = tr.coords.shape
        for e in range(E):
            ax.plot(tr.coords[:, e, 0], tr.coords[:, e, 1], "-", color=cmap(int(lab[e]) % 10), alpha=0.35, lw=0.8)
        ax.scatter(tr.coords[0, :, 0], tr.coords[0, :, 1], s=8, c="lightgray", edgecolors="gray", linewidths=0.3,
                   label=f"step {tr.steps[0]}")
        ax.scatter(tr.coords[-1, :, 0], tr.coords[-1, :, 1], s=18, c=[cmap(int(v) % 10) for v in lab],
                   edgecolors="k", linewidths=0.3, label=f"step {tr.steps[-1]}")
        drift = ", ".join(f"{d:.3f}" for d in tr.drift[:6]) + (" ..." if tr.drift.size > 6 else "")
        ax.set_title(f"layer {tr.layer}: {C} checkpoints\nmean key move per interval: {drift}", fontsize=8)
        ax.legend(fontsize=7, loc="best")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title)
    return save(fig, path)


def usage_histograms(usages: dict[int, np.ndarray], title: str, path: Path) -> Path:
    """Per layer: histogram of usage in units of the uniform share 1/E (1 = balanced)."""
    fig, axes = _grid(len(usages))
    for ax, (layer, usage) in zip(axes, sorted(usages.items())):
        rel = usage * usage.size
        ax.hist(rel, bins=30, color="C0", alpha=0.8)
        ax.axvline(1.0, color="k", ls="--", lw=1, label="uniform 1/E")
        ax.axvline(CENTER_FACTOR, color="C3", ls=":", lw=1, label=f"center {CENTER_FACTOR:g}/E")
        ax.set(xlabel="usage x E", ylabel="experts", title=f"layer {layer}: max {rel.max():.1f}/E, "
                                                           f"min {rel.min():.2f}/E")
        ax.legend(fontsize=7)
    fig.suptitle(title)
    return save(fig, path)


def readouts_over_training(evals: list[dict], layers: list[int], title: str, path: Path) -> Path | None:
    """Per-layer usage Gini, usage entropy (bits) and gate entropy (nats) at each eval of the run."""
    series = [("usage_gini", "usage Gini"), ("usage_entropy_bits", "usage entropy (bits)"),
              ("gate_entropy_nats", "gate entropy (nats)")]
    if not any(f"layer{i}/usage_gini" in r for r in evals for i in layers):
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, (key, label) in zip(axes, series):
        for i in layers:
            pts = [(r["step"], r[f"layer{i}/{key}"]) for r in evals if f"layer{i}/{key}" in r]
            if pts:
                ax.plot(*zip(*pts), "o-", ms=3, label=f"layer {i}")
        ax.set(xlabel="step", ylabel=label, title=label + " at each eval")
        ax.legend(fontsize=7)
    fig.suptitle(title)
    return save(fig, path)
