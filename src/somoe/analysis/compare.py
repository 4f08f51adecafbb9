"""``somoe compare``: one table and overlaid validation curves of several runs (from their files alone)."""

from __future__ import annotations

import json
from pathlib import Path

from ..report.summary import comparison_table, read_metrics, summarize_run
from .plots import pyplot, save


def check_runs(run_dirs: list[Path]) -> None:
    from ..report.summary import check_metrics

    for run in run_dirs:
        check_metrics(run)


def run_labels(run_dirs: list[Path], summaries: list[dict]) -> list[str]:
    """Config names, or folder names when two runs share a config name (runs of one preset)."""
    names = [s["name"] for s in summaries]
    return names if len(set(names)) == len(names) else [r.name for r in run_dirs]


def plot_comparison(run_dirs: list[Path], summaries: list[dict], labels: list[str], path: Path,
                    title: str = "") -> Path:
    """Val loss vs tokens seen, vs training wall time, val bpb vs training FLOPs, and best val ppl vs total
    parameters."""
    from .compute import bpb_against_flops

    plt = pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(21, 4.5))
    for i, (run, s) in enumerate(zip(run_dirs, summaries)):
        _, evals = read_metrics(run)
        color, name = f"C{i % 10}", labels[i]
        axes[0].plot([r["tokens"] / 1e6 for r in evals], [r["val_loss"] for r in evals], "o-", ms=3, color=color,
                     label=name)
        axes[1].plot([r.get("elapsed", 0.0) / 60 for r in evals], [r["val_loss"] for r in evals], "o-", ms=3,
                     color=color, label=name)
        axes[2].plot(*bpb_against_flops(run), "o-", ms=3, color=color, label=name)
        if s["params_total"] and s["best_val_ppl"]:
            axes[3].scatter(s["params_total"] / 1e6, s["best_val_ppl"], color=color, s=40)
            axes[3].annotate(name, (s["params_total"] / 1e6, s["best_val_ppl"]), fontsize=7,
                             xytext=(4, 4), textcoords="offset points")
    axes[0].set(xlabel="tokens seen (M)", ylabel="val loss (nats/token)", title="val loss vs tokens")
    axes[1].set(xlabel="training wall time (min)", ylabel="val loss (nats/token)", title="val loss vs wall time")
    axes[2].set(xscale="log", xlabel="training FLOPs (bench/flops)", ylabel="val bits per byte",
                title="val bpb vs training compute")
    axes[3].set(xlabel="total parameters (M)", ylabel="best val perplexity", title="ppl vs total params")
    for ax in axes[:3]:
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    return save(fig, path)


def compare_runs(run_dirs: list[str | Path], out: str | Path, title: str = "") -> str:
    """Write compare.md (table + figure), compare.json (raw figures) and compare.png into ``out``; return the table."""
    run_dirs = [Path(r) for r in run_dirs]
    check_runs(run_dirs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summaries = [summarize_run(r) for r in run_dirs]
    labels = run_labels(run_dirs, summaries)
    table = comparison_table(summaries, labels)
    plot_comparison(run_dirs, summaries, labels, out / "compare.png", title)
    rows = [{**s, "run_dir": str(r)} for s, r in zip(summaries, run_dirs)]
    (out / "compare.json").write_text(json.dumps(rows, indent=1), encoding="utf-8")
    text = (f"# {title or 'Comparison'}\n\nBest validation figures of each run; tokens/s over training wall time; "
            f"mid gini / H: the middle layer's expert-usage Gini and entropy at the last eval.\n\n```\n{table}\n```\n\n"
            f"![curves](compare.png)\n")
    (out / "compare.md").write_text(text, encoding="utf-8")
    return table
