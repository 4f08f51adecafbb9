"""The main job: seed 000 in miniature, SoME against its GPT-2 and classic-MoE baselines, on real stories.

Trains each preset in turn on the same data, tokenizer and token budget (the real TinyStories
stories shipped with somoe by default, other TinyStories files with ``--data DIR``), then prints
one table of their evaluations (val loss, ppl, bpb, trainable/total parameters, active forward
FLOPs per token, tokens/s, middle-layer usage Gini and entropy), a sample from each model, the
validation curves as one PNG (bpb against tokens seen) and a one-line verdict: is SoME better,
level or worse than GPT-2 at this size? The default trio is ``cpu_gpt2``, ``cpu_some`` and
``cpu_moe`` (one 4x128 backbone, only the FFN differs); ``--presets`` picks others. Re-running
resumes unfinished runs and skips finished ones, so an interrupted main job loses nothing.
"""

from __future__ import annotations

from pathlib import Path

from ..config import ConfigError, load_config

MAIN_JOB_PRESETS = ("cpu_gpt2", "cpu_some", "cpu_moe")
BASELINE, CANDIDATE = "cpu_gpt2", "cpu_some"  # the verdict compares these two when both ran
MOE_PRESET = "cpu_moe"  # --moe adds it to a --presets list that lacks it
SAMPLE_PROMPT = "Once upon a time"
# "level" = the two dev-set bpb within this margin. A rerun with another seed moves either model's bpb
# by up to ~0.005 at this size, so a gap inside 0.01 bpb (~0.8% of the value) is not a difference.
LEVEL_TOLERANCE_BPB = 0.01
GINI_COLLAPSE = 0.9  # a middle-layer usage Gini at or above this at any eval counts as routing collapse
CURVES_PNG = "main_job.png"


def data_overrides(folder: str | None) -> list[str]:
    """``--data DIR`` -> overrides pointing at DIR/train.txt and its dev/valid file."""
    if not folder:
        return []
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise ConfigError(f"--data {root}: no such folder; pass a folder holding TinyStories train.txt (and dev.txt), "
                          f"or leave --data out to use the built-in stories")
    train = root / "train.txt"
    if not train.is_file():
        raise ConfigError(f"{root} has no train.txt; point --data at a folder with TinyStories train.txt/dev.txt")
    val = next((root / n for n in ("dev.txt", "valid.txt", "validation.txt", "val.txt") if (root / n).is_file()),
               None)
    out = [f"data.train_path={train.resolve()}"]
    if val is not None:
        out.append(f"data.val_path={val.resolve()}")
    return out


def main_job_folder(data: str | None) -> Path:
    """The main job's default output folder, named after its data so that runs on other stories never
    resume (or overwrite) the built-in stories' runs: runs/main_job/builtin, or
    runs/main_job/NAME-HASH for ``--data`` folder NAME (HASH: 8 hex digits of its absolute path)."""
    import hashlib

    if not data:
        return Path("runs") / "main_job" / "builtin"
    root = Path(data).expanduser().resolve()
    return Path("runs") / "main_job" / f"{root.name}-{hashlib.sha256(str(root).encode()).hexdigest()[:8]}"


def train_preset(preset: str, run_dir: Path, overrides: list[str], allow_config_change: tuple[str, ...] = ()):
    from ..report.summary import write_report
    from ..train.trainer import Trainer

    cfg = load_config(preset=preset, overrides=overrides)
    trainer = Trainer(cfg, run_dir, resume="auto", allow_config_change=allow_config_change)
    counts = trainer.model.param_counts()
    trainer.log(f"== {preset}: {trainer.total_steps} steps | {counts['trainable'] / 1e6:.2f}M trainable of "
                f"{counts['total'] / 1e6:.2f}M | device {trainer.device} | precision {trainer.precision} | "
                f"{run_dir}")
    trainer.fit()
    print(write_report(run_dir), end="")
    return trainer


def active_flops_per_token(model_cfg) -> float:
    """Forward FLOPs per token of the experts a token actually uses (top-k only), from the config."""
    from ..bench.train import model_flops

    seq = model_cfg.max_seq_len
    return model_flops(model_cfg, 1, seq, backward=False) / seq


def plot_bpb_curves(run_dirs: list[Path], labels: list[str], path: Path) -> Path:
    """Validation bits per byte against tokens seen and against training FLOPs, one line per run, in one PNG."""
    from ..analysis.compute import bpb_against_flops
    from ..analysis.plots import pyplot, save
    from ..report.summary import read_metrics

    plt = pyplot()
    fig, (ax, ax_flops) = plt.subplots(1, 2, figsize=(13, 4.5))
    for i, (run, label) in enumerate(zip(run_dirs, labels)):
        evals = [r for r in read_metrics(run)[1] if r.get("val_bpb") is not None]
        ax.plot([r["tokens"] / 1e6 for r in evals], [r["val_bpb"] for r in evals], "o-", ms=3, color=f"C{i}",
                label=label)
        ax_flops.plot(*bpb_against_flops(run), "o-", ms=3, color=f"C{i}", label=label)
    ax.set(xlabel="tokens seen (M)", ylabel="validation bits per byte", title="main job: validation curves")
    ax_flops.set(xscale="log", xlabel="training FLOPs (forward + backward, bench/flops)",
                 ylabel="validation bits per byte", title="at equal compute")
    for axis in (ax, ax_flops):
        axis.grid(alpha=0.3)
        axis.legend()
    return save(fig, path)


def verdict(summaries: dict[str, dict]) -> str | None:
    """One line: SoME better / level / worse than GPT-2 in dev-set bpb, with the difference and its sign."""
    if BASELINE not in summaries or CANDIDATE not in summaries:
        return None
    some, gpt2 = summaries[CANDIDATE]["best_val_bpb"], summaries[BASELINE]["best_val_bpb"]
    if some is None or gpt2 is None:
        return None
    diff = some - gpt2
    word = "level with" if abs(diff) <= LEVEL_TOLERANCE_BPB else ("better than" if diff < 0 else "worse than")
    return (f"verdict: SoME ({CANDIDATE}) is {word} GPT-2 ({BASELINE}) at this size: {some:.4f} vs {gpt2:.4f} "
            f"validation bpb, difference {diff:+.4f} (SoME - GPT-2; level = within ±{LEVEL_TOLERANCE_BPB} bpb)")


def routing_line(name: str, summary: dict) -> str | None:
    """Collapse check over every eval of a SoME run's middle layer."""
    ginis = summary["middle_gini"]
    if not ginis:
        return None
    worst = max(ginis)
    state = "no collapse" if worst < GINI_COLLAPSE else "COLLAPSED"
    return (f"routing: {name} middle-layer usage Gini {ginis[0]:.3f} -> {ginis[-1]:.3f} over {len(ginis)} evals, "
            f"max {worst:.3f} ({state}: threshold {GINI_COLLAPSE})")


def run_quickstart(args) -> int:
    from ..generate.sampling import GenerationConfig, generate_text
    from ..report.summary import comparison_table, summarize_run
    from ..train.stopping import stop_code

    presets = [p for p in (args.presets or ",".join(MAIN_JOB_PRESETS)).split(",") if p]
    if args.moe and MOE_PRESET not in presets:
        presets.append(MOE_PRESET)  # the classic MoE baseline as one more row of the comparison
    overrides = data_overrides(args.data) + list(args.overrides)
    out = Path(args.out) if args.out else main_job_folder(args.data)
    source = args.data or "the built-in TinyStories stories (2,415 train, 300 dev; CDLA-Sharing-1.0)"
    print(f"main job: {' vs '.join(presets)} on {source}")
    samples, flops = {}, {}
    for preset in presets:
        trainer = train_preset(preset, out / preset, overrides, tuple(getattr(args, "allow_config_change", ())))
        if (code := stop_code(trainer)) is not None:  # the whole job stops; a rerun resumes this run
            print(f"main job stopped by {trainer.stop_signal} in {preset} at step {trainer.step}; run the same "
                  f"command again to resume")
            return code
        flops[preset] = active_flops_per_token(trainer.cfg.model)
        gen = GenerationConfig(max_new_tokens=120, temperature=0.8, top_p=0.95, seed=0)
        samples[preset] = generate_text(trainer.model, trainer.data.tokenizer, [SAMPLE_PROMPT], gen)[0]
    run_dirs = [out / p for p in presets]
    summaries = {p: summarize_run(d) for p, d in zip(presets, run_dirs)}
    table = comparison_table(list(summaries.values()), presets,
                             extra={"fwd MFLOP/tok": [f"{flops[p] / 1e6:.2f}" for p in presets]})
    print("\n" + table)
    for preset, text in samples.items():
        print(f"\n--- {preset} sample ---\n{SAMPLE_PROMPT}{text}")
    print(f"\nvalidation curves (bpb vs tokens and vs training FLOPs): {plot_bpb_curves(run_dirs, presets, out / CURVES_PNG)}")
    from ..analysis.compute import equal_compute_line

    for line in [routing_line(p, s) for p, s in summaries.items()] + [verdict(summaries),
                                                                      equal_compute_line(run_dirs, presets)]:
        if line:
            print(line)
    return 0
