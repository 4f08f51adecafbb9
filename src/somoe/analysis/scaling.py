"""A sweep's figures against one config value (``scaling:`` in a sweep file, e.g. the expert count):
best dev bpb, expert coverage and KL to uniform, and training step time, with a table (from run files alone)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from ..report.summary import read_metrics, summarize_run
from .plots import pyplot, save


def _value(config: dict, dotted: str):
    for part in dotted.split("."):
        config = config.get(part, {}) if isinstance(config, dict) else {}
    return config if not isinstance(config, dict) else None


def _layer_mean(row: dict, name: str) -> float | None:
    values = [v for k, v in row.items() if k.startswith("layer") and k.endswith("/" + name)]
    return sum(values) / len(values) if values else None


def scaling_rows(run_dirs: list[Path], key: str) -> list[dict]:
    """One row per run: the key's value, router, best bpb, last eval's coverage / KL (mean over layers),
    coverage over the run, step time."""
    rows = []
    for run in run_dirs:
        config = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
        s = summarize_run(run)
        _, evals = read_metrics(run)
        last = evals[-1] if evals else {}
        rows.append({"run": run.name, key: _value(config, key),
                     "router": _value(config, "model.some.router") or "exhaustive",
                     "best_val_bpb": s["best_val_bpb"], "coverage_eval": _layer_mean(last, "coverage"),
                     "coverage_run": _layer_mean(last, "run_coverage"),
                     "kl_uniform": _layer_mean(last, "usage_kl_uniform"),
                     "codebook_gini_max": max([last[k] for k in last if k.endswith("/codebook_gini_max")], default=None),
                     "step_ms": 1e3 * s["wall_time_s"] / s["steps"] if s["steps"] else None})
    return rows


def _table(rows: list[dict], key: str) -> str:
    def fmt(v, spec):
        return "-" if v is None else format(v, spec)

    lines = [f"| run | {key.split('.')[-1]} | router | best bpb | coverage (eval) | coverage (run) | KL | "
             f"codebook Gini | step ms |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r[key]:,} | {r['router']} | {fmt(r['best_val_bpb'], '.4f')} | "
                     f"{fmt(r['coverage_eval'], '.3f')} | {fmt(r['coverage_run'], '.3f')} | "
                     f"{fmt(r['kl_uniform'], '.3f')} | {fmt(r['codebook_gini_max'], '.3f')} | {fmt(r['step_ms'], '.0f')} |")
    return "\n".join(lines)


def scaling_report(run_dirs: list[str | Path], key: str, out: str | Path) -> str:
    """Write scaling.png, scaling.json and scaling.md into ``out``; return the markdown table."""
    run_dirs, out = [Path(r) for r in run_dirs], Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = scaling_rows(run_dirs, key)
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for router, marker in (("product", "o-"), ("exhaustive", "s--")):
        sel = sorted((r for r in rows if r["router"] == router and r[key]), key=lambda r: r[key])
        if not sel:
            continue
        xs = [r[key] for r in sel]
        axes[0].plot(xs, [r["best_val_bpb"] for r in sel], marker, label=router)
        for metric, label in (("coverage_eval", "coverage (eval)"), ("coverage_run", "coverage (run)")):
            pts = [(x, r[metric]) for x, r in zip(xs, sel) if r[metric] is not None]
            if pts:
                axes[1].plot(*zip(*pts), marker, label=f"{router}: {label}")
        kl = [(x, r["kl_uniform"]) for x, r in zip(xs, sel) if r["kl_uniform"] is not None]
        if kl:
            ax_kl = axes[1].twinx() if not hasattr(axes[1], "_kl") else axes[1]._kl
            axes[1]._kl = ax_kl
            ax_kl.plot(*zip(*kl), marker, color="C3", label=f"{router}: KL")
            ax_kl.set_ylabel("KL(usage || uniform), nats", color="C3")
        axes[2].plot(xs, [r["step_ms"] for r in sel], marker, label=router)
    name = key.split(".")[-1]
    axes[0].set(xscale="log", xlabel=name, ylabel="best dev bpb", title=f"bpb vs {name}")
    axes[1].set(xscale="log", xlabel=name, ylabel="share of experts routed", title=f"coverage and KL vs {name}")
    axes[2].set(xscale="log", xlabel=name, ylabel="ms per training step", title=f"step time vs {name}")
    for ax in axes:
        ax.legend(fontsize=7)
    save(fig, out / "scaling.png")
    (out / "scaling.json").write_text(json.dumps(rows, indent=1), encoding="utf-8")
    table = _table(rows, key)
    (out / "scaling.md").write_text(f"# Against {key}\n\n{table}\n\n![scaling](scaling.png)\n", encoding="utf-8")
    return table
