"""``somoe analyze`` for a product-key SoME run: each layer's ``n x n`` expert-usage map on held-out text
(log colour scale; expert ``(i, j)`` at row ``i``, column ``j``, every head's slots together) and its
codebooks' sub-key galaxies (PCA of each codebook, coloured by the sub-keys' usage EMA)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from ..data import eval_batches
from ..report.summary import read_metrics
from .plots import pyplot, save


@torch.no_grad()
def usage_maps(loaded, stream, batches: int) -> dict[int, dict]:
    """Per product-key layer: routed slots per expert (n x n) and per sub-key, over ``batches`` windows."""
    model = loaded.model.eval()
    model.reset_readouts()
    seq, pad = loaded.cfg.data.seq_len, loaded.tokenizer.pad_id
    for i, (x, _) in enumerate(eval_batches(stream, seq, 8, pad_id=pad)):
        if i >= batches:
            break
        model(x.to(next(model.parameters()).device))
    out = {}
    for index, ffn in enumerate(model.ffns()):
        if getattr(ffn, "product", False):
            n = ffn.cfg.subkeys_per_codebook
            out[index] = {"counts_nn": ffn._tally.counts.cpu().numpy().reshape(n, n), "readouts": ffn.readouts(),
                          "subkeys": ffn.key_store.float().cpu().numpy(), "usage": ffn.usage_ema.cpu().numpy()}
    return out


def _pca(points: np.ndarray) -> np.ndarray:
    centred = points - points.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return centred @ vt[:2].T


def plot_usage_maps(maps: dict[int, dict], title: str, path: Path) -> Path:
    plt = pyplot()
    from matplotlib.colors import LogNorm

    cols = min(len(maps), 4)
    rows = math.ceil(len(maps) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 4.2 * rows), squeeze=False)
    for ax in axes.flat[len(maps):]:
        ax.axis("off")
    for ax, (layer, m) in zip(axes.flat, maps.items()):
        counts = m["counts_nn"]
        image = ax.imshow(np.where(counts > 0, counts, np.nan), norm=LogNorm(vmin=1, vmax=max(counts.max(), 2)),
                          cmap="viridis", interpolation="nearest")
        r = m["readouts"]
        ax.set(title=f"layer {layer}: coverage {r.get('coverage', 0):.2f}, KL {r.get('usage_kl_uniform', 0):.2f}",
               xlabel="sub-key j (second codebook)", ylabel="sub-key i (first codebook)")
        fig.colorbar(image, ax=ax, fraction=0.046, label="routed slots (white: none)")
    fig.suptitle(title)
    return save(fig, path)


def plot_codebooks(maps: dict[int, dict], title: str, path: Path) -> Path:
    plt = pyplot()
    panels = [(layer, g) for layer, m in maps.items() for g in range(m["subkeys"].shape[0])]
    cols = min(len(panels), 4)
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.8 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (layer, g) in zip(axes.flat, panels):
        keys, usage = maps[layer]["subkeys"][g], maps[layer]["usage"][g]
        xy = _pca(keys)
        points = ax.scatter(xy[:, 0], xy[:, 1], c=np.log10(np.maximum(usage * len(usage), 1e-3)), s=8,
                            cmap="plasma")
        ax.set(title=f"layer {layer}, codebook {g} (head {g // 2}, half {g % 2})", xticks=[], yticks=[])
        fig.colorbar(points, ax=ax, fraction=0.046, label="log10 usage x n")
    fig.suptitle(title)
    return save(fig, path)


def analyze_product_run(run_dir: Path, out: Path, data: str | None, batches: int, device: str, log) -> Path:
    """Write usage_maps.png, codebooks.png, analysis.md and analysis.json of a product-key run into ``out``."""
    from ..evaluate.runs import file_stream, load_run, run_val_stream

    loaded = load_run(run_dir, device=device)
    stream = file_stream(data, loaded) if data else run_val_stream(loaded)
    maps = usage_maps(loaded, stream, batches)
    name = run_dir.name
    plot_usage_maps(maps, f"{name}: expert usage on {data or 'the validation split'} ({batches} batches)",
                    out / "usage_maps.png")
    plot_codebooks(maps, f"{name}: sub-key codebooks (PCA), coloured by usage EMA", out / "codebooks.png")
    _, evals = read_metrics(run_dir)
    keys = ("coverage", "coverage_slots", "usage_kl_uniform", "max_violation", "codebook_gini_max",
            "codebook_entropy_norm_mean", "dormant")
    lines = [f"# Analysis of {name} (product keys)", "",
             f"Checkpoint {loaded.checkpoint.name}; usage over {batches} batches of "
             f"{data or 'the validation split'}.", "",
             "| layer | n x n | coverage | slots | KL to uniform (nats) | MaxVio | codebook Gini (max) | "
             "codebook entropy (mean, norm.) | dormant sub-keys |", "|---|---|---|---|---|---|---|---|---|"]
    for layer, m in maps.items():
        r = m["readouts"]
        n = m["counts_nn"].shape[0]
        lines.append(f"| {layer} | {n} x {n} | " + " | ".join(f"{r.get(k, float('nan')):.3f}" for k in keys[:1])
                     + f" | {r.get('coverage_slots', 0):,.0f} | "
                     + " | ".join(f"{r.get(k, float('nan')):.3f}" for k in keys[2:6]) + f" | {r.get('dormant', 0):.0f} |")
    lines += ["", "![usage maps](usage_maps.png)", "", "![codebooks](codebooks.png)", ""]
    if evals:
        lines += [f"Training's last eval (step {evals[-1]['step']}): run coverage "
                  + ", ".join(f"layer {i} {evals[-1].get(f'layer{i}/run_coverage', float('nan')):.3f}" for i in maps), ""]
    (out / "analysis.md").write_text("\n".join(lines), encoding="utf-8")
    raw = {"run": str(run_dir), "checkpoint": str(loaded.checkpoint),
           "layers": {str(i): {"readouts": m["readouts"], "counts_nn": m["counts_nn"].tolist()} for i, m in maps.items()}}
    (out / "analysis.json").write_text(json.dumps(raw), encoding="utf-8")
    log(f"wrote {out / 'analysis.md'} and 2 figures")
    return out / "analysis.md"
