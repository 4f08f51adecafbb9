"""The main job: seed 000 in miniature, SoME against its GPT-2 baseline, side by side.

Trains each preset in turn on the same data and token budget (offline on the
built-in corpus by default, TinyStories files with ``--data DIR``), then prints
a table of their evaluations (val loss, ppl, bpb, trainable/total parameters,
tokens/s, middle-layer usage Gini and entropy) and a sample from each model.
The default pair is ``cpu_gpt2`` and ``cpu_some`` (same 4x128 backbone, data,
and 300 steps); ``--presets`` picks others (e.g. ``quickstart``, a stronger
dense model) and ``--moe`` adds the classic MoE row. Re-running resumes or
skips finished runs, so an interrupted main job loses nothing.
"""

from __future__ import annotations

from pathlib import Path

from .config import ConfigError, load_config

MAIN_JOB_PRESETS = ("cpu_gpt2", "cpu_some")
# The default pair trains 300 of the presets' 400 steps so that the whole job, fresh venv included,
# stays under 10 minutes on 2 CPU cores (on real text the pair is level from step 300 on:
# docs/results.md). A train.max_steps=N override or --presets restores full control.
MAIN_JOB_STEPS = 300
MOE_PRESET = "cpu_moe"  # --moe: noisy top-k MoE on cpu_gpt2's backbone
SAMPLE_PROMPT = "Once upon a time"


def data_overrides(folder: str | None) -> list[str]:
    """``--data DIR`` -> overrides pointing at DIR/train.txt and its dev/valid file."""
    if not folder:
        return []
    root = Path(folder)
    train = root / "train.txt"
    if not train.is_file():
        raise ConfigError(f"{root} has no train.txt; point --data at a folder with TinyStories train.txt/dev.txt")
    val = next((root / n for n in ("dev.txt", "valid.txt", "validation.txt", "val.txt") if (root / n).is_file()),
               None)
    out = [f"data.train_path={train.resolve()}"]
    if val is not None:
        out.append(f"data.val_path={val.resolve()}")
    return out


def train_preset(preset: str, run_dir: Path, overrides: list[str]):
    from .report import write_report
    from .train.trainer import Trainer

    cfg = load_config(preset=preset, overrides=overrides)
    trainer = Trainer(cfg, run_dir, resume="auto")
    counts = trainer.model.param_counts()
    trainer.log(f"== {preset}: {trainer.total_steps} steps | {counts['trainable'] / 1e6:.2f}M trainable of "
                f"{counts['total'] / 1e6:.2f}M | device {trainer.device} | precision {trainer.precision} | "
                f"{run_dir}")
    trainer.fit()
    print(write_report(run_dir), end="")
    return trainer


def run_quickstart(args) -> int:
    from .generate import GenerationConfig, generate_text
    from .report import comparison_table, summarize_run

    presets = [p for p in (args.presets or ",".join(MAIN_JOB_PRESETS)).split(",") if p]
    if args.moe and MOE_PRESET not in presets:
        presets.append(MOE_PRESET)  # the classic MoE baseline as one more row of the comparison
    overrides = data_overrides(args.data) + list(args.overrides)
    if not args.presets:
        overrides.insert(0, f"train.max_steps={MAIN_JOB_STEPS}")  # later overrides win
    out = Path(args.out)
    source = args.data or "the built-in corpus (offline; real results need TinyStories: --data DIR)"
    print(f"main job: {' vs '.join(presets)} on {source}")
    samples = {}
    for preset in presets:
        trainer = train_preset(preset, out / preset, overrides)
        gen = GenerationConfig(max_new_tokens=120, temperature=0.8, top_p=0.95, seed=0)
        samples[preset] = generate_text(trainer.model, trainer.data.tokenizer, [SAMPLE_PROMPT], gen)[0]
    print("\n" + comparison_table([summarize_run(out / p) for p in presets]))
    for preset, text in samples.items():
        print(f"\n--- {preset} sample ---\n{SAMPLE_PROMPT}{text}")
    return 0
