"""``somoe analyze``: the knowledge-galaxy report of a SoME run (analysis.md, analysis.json, PNGs).

Key geometry, usage and dormancy come from the checkpoint files alone; the
readouts over training from ``metrics.jsonl``; expert specialisation from one
forward pass of the last checkpoint over held-out text (the run's validation
split unless ``data`` names a file).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..report.summary import read_metrics
from . import plots
from .galaxy import (CENTER_FACTOR, cluster_keys, cluster_usage, dormancy_history, galactic_centers, pca_2d,
                     tsne_2d)
from .keys import load_run_keys
from .trajectories import key_trajectories


def _layer_summary(states, layer: int, clustering) -> dict:
    last = states[-1].layers[layer]
    centers = galactic_centers(last.usage)
    dormancy = dormancy_history(states, layer)
    E = last.num_experts
    return {
        "layer": layer, "experts": E, "cluster_labels": clustering.labels.tolist(),
        "clusters": clustering.k, "cluster_sizes": clustering.sizes(), "silhouette": clustering.silhouette,
        "cluster_usage": cluster_usage(clustering, last.usage),
        "centers": [{"expert": int(e), "usage_x_E": float(last.usage[e] * E)} for e in centers],
        "usage_max_x_E": float(last.usage.max() * E), "usage_min_x_E": float(last.usage.min() * E),
        "dormant_now": [r.expert for r in dormancy if r.dormant_now],
        "dormant": [{"expert": r.expert, "first_seen_step": r.first_seen_step, "longest_streak": r.longest_streak,
                     "dormant_now": r.dormant_now, "recovered": r.recovered} for r in dormancy],
    }


def _product_keys(run_dir: Path) -> bool:
    from ..train.checkpoint import load_config_from

    try:
        return load_config_from(run_dir).model.some.router == "product"
    except Exception:  # noqa: BLE001 - no readable config: the checkpoint readers report it in their own words
        return False


def analyze_run(run_dir: str | Path, checkpoints: str = "all", out: str | Path | None = None,
                data: str | None = None, sample_batches: int = 20, method: str = "kmeans",
                k: int | None = None, device: str = "cpu", log=print) -> Path:
    """Write the analysis of ``run_dir`` into ``out`` (default RUN/analysis); returns analysis.md."""
    run_dir = Path(run_dir)
    if data:  # a bad --data file fails before minutes of clustering and plotting, not after
        from ..config import ConfigError
        from ..data.sources import read_story_file

        if not read_story_file(data):
            raise ConfigError(f"--data {data} holds no stories; pass a non-empty .txt/.jsonl/.parquet file")
    out = Path(out) if out else run_dir / "analysis"
    if _product_keys(run_dir):  # sub-key codebooks and an n x n pool: maps instead of key galaxies
        from .product_keys import analyze_product_run

        out.mkdir(parents=True, exist_ok=True)
        return analyze_product_run(run_dir, out, data, sample_batches, device, log)
    out.mkdir(parents=True, exist_ok=True)
    states = load_run_keys(run_dir, checkpoints)
    last = states[-1]
    layers = sorted(last.layers)
    name = run_dir.name
    log(f"analyzing {name}: {len(states)} checkpoint(s) (steps {', '.join(str(s.step) for s in states)}), "
        f"SoME layers {layers}")

    clusterings = {i: cluster_keys(last.layers[i].keys, k=k, method=method) for i in layers}
    summaries = {i: _layer_summary(states, i, clusterings[i]) for i in layers}
    figures = {}
    pca_panels, tsne_panels = [], []
    for i in layers:
        lk, clustering = last.layers[i], clusterings[i]
        xy, var = pca_2d(lk.keys)
        summaries[i]["pca_variance"] = [float(v) for v in var]
        pca_panels.append((f"layer {i} PCA ({100 * var.sum():.0f}% var)", xy, lk.usage, clustering))
        tsne_panels.append((f"layer {i} t-SNE", tsne_2d(lk.keys), lk.usage, clustering))
    figures["keys_pca"] = plots.galaxy_plot(pca_panels, f"{name}: key stores at step {last.step} (PCA)",
                                            out / "keys_pca.png")
    figures["keys_tsne"] = plots.galaxy_plot(tsne_panels, f"{name}: key stores at step {last.step} (t-SNE)",
                                             out / "keys_tsne.png")
    if len(states) > 1:
        trajs = [key_trajectories(states, i) for i in layers]
        figures["trajectories"] = plots.trajectory_plot(
            trajs, [clusterings[i].labels for i in layers],
            f"{name}: key movement across checkpoints (one shared PCA per layer)", out / "trajectories.png")
        for tr in trajs:
            summaries[tr.layer]["drift_between_checkpoints"] = [float(d) for d in tr.drift]
    figures["usage_hist"] = plots.usage_histograms({i: last.layers[i].usage for i in layers},
                                                   f"{name}: expert usage (EMA) at step {last.step}",
                                                   out / "usage_hist.png")
    _, evals = read_metrics(run_dir)
    readouts = plots.readouts_over_training(evals, layers, f"{name}: routing readouts over training",
                                            out / "readouts.png")
    if readouts:
        figures["readouts"] = readouts

    specialization = _specialization(run_dir, data, sample_batches, device, log)
    report = _markdown(name, run_dir, states, summaries, figures, evals, layers, specialization)
    (out / "analysis.md").write_text(report, encoding="utf-8")
    raw = {"run": str(run_dir), "steps": [s.step for s in states], "center_factor": CENTER_FACTOR,
           "layers": {str(i): s for i, s in summaries.items()}, "specialization": specialization}
    (out / "analysis.json").write_text(json.dumps(raw, indent=1), encoding="utf-8")
    log(f"wrote {out / 'analysis.md'} and {len(figures)} figures")
    return out / "analysis.md"


def _specialization(run_dir: Path, data: str | None, batches: int, device: str, log) -> dict:
    from ..evaluate.runs import file_stream, load_run, run_val_stream
    from .specialization import expert_tokens, route_counts

    loaded = load_run(run_dir, device=device)
    stream = file_stream(data, loaded) if data else run_val_stream(loaded)
    routing = route_counts(loaded.model, stream, loaded.cfg.data.seq_len, max_batches=batches,
                           pad_id=loaded.tokenizer.pad_id)
    out = {}
    for i, r in routing.items():
        out[str(i)] = [{"expert": t.expert, "share": t.share, "top_by_count": t.top_by_count,
                        "top_by_lift": t.top_by_lift} for t in expert_tokens(r, loaded.tokenizer)]
    log(f"specialization: {int(sum(r.expert_slots.sum() for r in routing.values()))} routed slots "
        f"from {data or 'the validation split'}")
    return out


def _markdown(name, run_dir, states, summaries, figures, evals, layers, specialization) -> str:
    last = states[-1]
    lines = [f"# Analysis of `{name}`", "",
             f"Run folder `{run_dir}`; checkpoints analysed: steps {', '.join(str(s.step) for s in states)} "
             f"(last: step {last.step}, {last.tokens:,} tokens). Keys are compared by direction (unit keys). "
             f"A *galactic center* routes at least {CENTER_FACTOR:g}x the uniform share 1/E (usage EMA); "
             f"an expert is *dormant* while the layer's threshold rule marks it (usage below theta).", "",
             "## Knowledge galaxies (last checkpoint)", "",
             "| layer | E | clusters | sizes | silhouette | cluster usage shares | centers (expert: usage x E) "
             "| usage max/min x E |", "|---|---|---|---|---|---|---|---|"]
    for i in layers:
        s = summaries[i]
        centers = ", ".join(f"{c['expert']}: {c['usage_x_E']:.1f}" for c in s["centers"][:8]) or "none"
        if len(s["centers"]) > 8:
            centers += f" (+{len(s['centers']) - 8})"
        lines.append(f"| {i} | {s['experts']} | {s['clusters']} | {s['cluster_sizes']} | {s['silhouette']:.3f} | "
                     f"{', '.join(f'{u:.2f}' for u in s['cluster_usage'])} | {centers} | "
                     f"{s['usage_max_x_E']:.2f} / {s['usage_min_x_E']:.3f} |")
    lines += ["", "![PCA](keys_pca.png)", "", "![t-SNE](keys_tsne.png)", ""]
    if "trajectories" in figures:
        lines += ["## Key movement", "", "Mean distance the unit keys moved between consecutive analysed "
                  "checkpoints (full space):", ""]
        for i in layers:
            d = summaries[i].get("drift_between_checkpoints", [])
            lines.append(f"- layer {i}: " + ", ".join(f"{v:.4f}" for v in d))
        lines += ["", "![trajectories](trajectories.png)", ""]
    lines += ["## Usage and dormancy", "", "![usage](usage_hist.png)", "",
              "| layer | dormant now | ever dormant | recovered | longest streak (updates) |", "|---|---|---|---|---|"]
    for i in layers:
        d = summaries[i]["dormant"]
        lines.append(f"| {i} | {len(summaries[i]['dormant_now'])} | {len(d)} | {sum(r['recovered'] for r in d)} | "
                     f"{max([r['longest_streak'] for r in d] or [0])} |")
    if "readouts" in figures:
        lines += ["", "## Routing readouts over training", "", "![readouts](readouts.png)", "",
                  "| step | " + " | ".join(f"L{i} gini / H bits / gate H" for i in layers) + " |",
                  "|---|" + "---|" * len(layers)]
        for r in evals:
            cells = []
            for i in layers:
                g, h, ge = (r.get(f"layer{i}/{k}") for k in ("usage_gini", "usage_entropy_bits", "gate_entropy_nats"))
                cells.append("-" if g is None else f"{g:.3f} / {h:.2f} / {ge:.2f}")
            lines.append(f"| {r['step']} | " + " | ".join(cells) + " |")
    lines += ["", "## Expert specialisation (held-out text, last checkpoint)", "",
              "Busiest experts per layer; tokens by count, and by lift (the token's share of the expert's slots "
              "over its share of all slots, tokens seen at least 5 times).", ""]
    for i in layers:
        lines += [f"### layer {i}", "", "| expert | share | top tokens (count) | top tokens (lift) |",
                  "|---|---|---|---|"]
        for t in specialization.get(str(i), []):
            by_count = " ".join(f"`{tok}` {n}" for tok, n in t["top_by_count"][:6])
            by_lift = " ".join(f"`{tok}` {lift:.1f}" for tok, lift, _ in t["top_by_lift"][:6])
            by_count, by_lift = (cell.replace("|", "\\|") for cell in (by_count, by_lift))  # markdown cells
            lines.append(f"| {t['expert']} | {t['share']:.3f} | {by_count} | {by_lift} |")
        lines.append("")
    return "\n".join(lines) + "\n"
