"""A run's ``summary.txt`` and ``metrics.png``, rebuilt from its files alone.

Everything here reads ``metrics.jsonl``, ``config.yaml`` and ``params.json``
of a run folder, so ``somoe report RUN`` regenerates both without retraining.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import yaml

from ..train.metrics_file import read_jsonl


def read_records(run_dir: Path) -> list[dict]:
    """Every record of ``metrics.jsonl`` (train, eval, final ...), in order; [] without the file."""
    return read_jsonl(Path(run_dir) / "metrics.jsonl")  # a torn last line (a killed write) is skipped, with a warning


def check_metrics(run_dir: Path) -> None:
    """Refuse a folder with no metrics.jsonl, or one without a single complete record (empty, binary, torn)."""
    from ..config import ConfigError

    file = Path(run_dir) / "metrics.jsonl"
    if not Path(run_dir).is_dir():
        raise ConfigError(f"{run_dir} is not a run folder ({'a file' if Path(run_dir).exists() else 'no such folder'}); "
                          f"pass a folder written by somoe train")
    if not file.is_file():
        raise ConfigError(f"{run_dir} has no metrics.jsonl; pass a run folder written by somoe train")
    if not read_records(run_dir):
        raise ConfigError(f"{file} holds no complete record (empty, truncated or not JSON lines); pass a run "
                          f"folder written by somoe train, or retrain it")


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(train records, eval records) of ``metrics.jsonl``."""
    records = read_records(run_dir)
    return [r for r in records if r.get("kind") == "train"], [r for r in records if r.get("kind") == "eval"]


def middle_layer(config: dict) -> int:
    return int(config.get("model", {}).get("n_layers", 0)) // 2


def _newest_checkpoint_state(run_dir: Path) -> dict:
    """trainer_state.json of the run's newest checkpoint ({} without one, or if it cannot be read)."""
    from ..train.checkpoint import list_checkpoints, read_trainer_state

    ckpts = list_checkpoints(run_dir) if run_dir.is_dir() else []
    try:
        return read_trainer_state(ckpts[-1]) if ckpts else {}
    except (OSError, ValueError):
        return {}


def summarize_run(run_dir: Path) -> dict[str, Any]:
    """The figures a summary reports, as a dict (also what ``somoe compare`` tabulates)."""
    run_dir = Path(run_dir)
    config_text = (run_dir / "config.yaml").read_text(encoding="utf-8") if (run_dir / "config.yaml").is_file() else ""
    config = yaml.safe_load(config_text) or {}
    params = json.loads((run_dir / "params.json").read_text()) if (run_dir / "params.json").is_file() else {}
    train, evals = read_metrics(run_dir)
    best = min(evals, key=lambda r: r["val_loss"]) if evals else {}
    last_train = train[-1] if train else {}
    elapsed = max([r.get("elapsed", 0.0) for r in train + evals] or [0.0])
    tokens = max([r.get("tokens", 0) for r in train + evals] or [0])
    steps = max([r.get("step", 0) for r in train + evals] or [0])
    saved = _newest_checkpoint_state(run_dir)  # a stopped run saves past its last logged step
    steps, tokens = max(steps, saved.get("step", 0)), max(tokens, saved.get("tokens_seen", 0))
    elapsed = max(elapsed, saved.get("elapsed", 0.0))
    seq = config.get("data", {}).get("seq_len", 0) * config.get("train", {}).get("batch_size", 0)
    mid = middle_layer(config)
    mid_key = f"layer{mid}/"
    return {
        "name": config.get("name", run_dir.name),
        "config_digest": hashlib.sha256(config_text.encode()).hexdigest()[:12],
        "ffn": config.get("model", {}).get("ffn", "?"),
        "params_total": params.get("total"), "params_trainable": params.get("trainable"),
        "best_val_loss": best.get("val_loss"), "best_val_ppl": best.get("val_ppl"),
        "best_val_bpb": best.get("val_bpb"), "best_step": best.get("step"),
        "final_val_loss": evals[-1]["val_loss"] if evals else None,
        "final_train_loss": last_train.get("loss"),
        "steps": steps, "tokens_seen": tokens, "wall_time_s": elapsed,
        "tokens_per_s": steps * seq / elapsed if elapsed > 0 else None,
        "middle_layer": mid,
        "middle_gini": [r.get(mid_key + "usage_gini") for r in evals if mid_key + "usage_gini" in r],
        "middle_entropy_bits": [r.get(mid_key + "usage_entropy_bits") for r in evals
                                if mid_key + "usage_entropy_bits" in r],
        # large-pool readouts of product-key layers (coverage, KL to uniform, MaxVio, codebooks)
        "middle_pool": [{k: r[mid_key + k] for k in POOL_READOUTS if mid_key + k in r}
                        for r in evals if mid_key + "codebook_gini_max" in r],
    }


POOL_READOUTS = ("coverage", "coverage_slots", "usage_kl_uniform", "max_violation", "codebook_gini_max", "dormant")


def _pool_line(p: dict) -> str:
    return (f"    coverage {p['coverage']:.3f} (over {p['coverage_slots']:,.0f} slots), KL to uniform "
            f"{p['usage_kl_uniform']:.3f} nats, MaxVio {p['max_violation']:.2f}, codebook Gini <= "
            f"{p['codebook_gini_max']:.3f}, dormant sub-keys {p['dormant']:.0f}")


def _fmt(value: Any, spec: str = ".4f") -> str:
    if value is None:
        return "n/a"
    return format(value, spec) if isinstance(value, float) else str(value)


def write_summary(run_dir: Path) -> str:
    s = summarize_run(run_dir)
    lines = [
        f"run: {s['name']}  (config digest {s['config_digest']}, ffn={s['ffn']})",
        f"parameters: total {_fmt(s['params_total'], ',')}  trainable {_fmt(s['params_trainable'], ',')}",
        f"best val loss: {_fmt(s['best_val_loss'])}  ppl {_fmt(s['best_val_ppl'], '.3f')}  "
        f"bpb {_fmt(s['best_val_bpb'])}  (step {s['best_step']})",
        f"final train loss: {_fmt(s['final_train_loss'])}  final val loss: {_fmt(s['final_val_loss'])}",
        f"steps: {s['steps']}  tokens seen: {s['tokens_seen']:,}  wall time: {s['wall_time_s']:.1f} s  "
        f"throughput: {_fmt(s['tokens_per_s'], ',.0f')} tokens/s",
    ]
    if s["middle_gini"]:
        lines.append(f"middle layer ({s['middle_layer']}) expert usage per eval:")
        pool = s["middle_pool"] if len(s["middle_pool"]) == len(s["middle_gini"]) else []
        for i, (g, h) in enumerate(zip(s["middle_gini"], s["middle_entropy_bits"])):
            lines.append(f"  eval {i + 1}: gini {g:.3f}  entropy {h:.3f} bits")
            if pool:
                lines.append(_pool_line(pool[i]))
    text = "\n".join(lines) + "\n"
    (Path(run_dir) / "summary.txt").write_text(text, encoding="utf-8")
    return text


def plot_metrics(run_dir: Path) -> Path | None:
    """Loss, perplexity and (SoME) middle-layer Gini/entropy curves into metrics.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    train, evals = read_metrics(run_dir)
    if not train and not evals:
        return None
    s = summarize_run(run_dir)
    panels = 3 if s["middle_gini"] else 2
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4))
    ax = axes[0]
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train", alpha=0.7)
    ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="val")
    ax.set(xlabel="step", ylabel="loss (nats/token)", title="loss")
    ax.legend()
    ax = axes[1]
    ax.plot([r["step"] for r in train], [math.exp(min(r["loss"], 20)) for r in train], label="train", alpha=0.7)
    ax.plot([r["step"] for r in evals], [r["val_ppl"] for r in evals], "o-", label="val")
    ax.set(xlabel="step", ylabel="perplexity", yscale="log", title="perplexity")
    ax.legend()
    if panels == 3:
        ax = axes[2]
        steps = [r["step"] for r in evals][-len(s["middle_gini"]):]
        ax.plot(steps, s["middle_gini"], "o-", color="C3", label="Gini")
        ax.set(xlabel="step", ylabel="usage Gini", title=f"layer {s['middle_layer']} expert usage")
        twin = ax.twinx()
        twin.plot(steps, s["middle_entropy_bits"], "s--", color="C2", label="entropy (bits)")
        twin.set_ylabel("usage entropy (bits)")
        ax.legend(loc="upper left")
        twin.legend(loc="upper right")
    fig.suptitle(s["name"])
    fig.tight_layout()
    out = run_dir / "metrics.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def write_report(run_dir: Path) -> str:
    check_metrics(run_dir)
    plot_metrics(run_dir)
    return write_summary(run_dir)


def comparison_table(summaries: list[dict[str, Any]], labels: list[str] | None = None,
                     extra: dict[str, list[str]] | None = None) -> str:
    """Side-by-side table of runs (best val figures, sizes, speed, middle-layer routing) from their
    :func:`summarize_run` dicts. ``labels`` replace the config names in the first column (runs of one
    preset share a name); ``extra`` adds columns (name -> one cell per run) after the parameter counts."""
    extra = extra or {}
    header = ("run", "ffn", "val loss", "ppl", "bpb", "trainable", "total", *extra, "tokens", "tok/s", "mid gini",
              "mid H bits")
    rows = [header]
    for i, s in enumerate(summaries):
        rows.append((
            labels[i] if labels else s["name"], s["ffn"], _fmt(s["best_val_loss"]), _fmt(s["best_val_ppl"], ".3f"),
            _fmt(s["best_val_bpb"]), _millions(s["params_trainable"]), _millions(s["params_total"]),
            *(cells[i] for cells in extra.values()), _millions(s["tokens_seen"]), _fmt(s["tokens_per_s"], ",.0f"),
            _fmt(s["middle_gini"][-1], ".3f") if s["middle_gini"] else "-",
            _fmt(s["middle_entropy_bits"][-1], ".3f") if s["middle_entropy_bits"] else "-",
        ))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(header))]
    lines = [" | ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def _millions(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 1e6:.2f}M"
