"""``somoe transition``: dense training, upcycling with verification, MoE training (seed 004).

Layout of the output folder::

    OUT/dense/                 phase 1: an ordinary run folder (model.ffn=dense)
    OUT/moe/                   phase 2: an ordinary run folder started from the upcycled checkpoint
    OUT/checkpoints/{dense,moe_init,moe_final}/   the three checkpoints (hard links into the runs)
    OUT/training_history.jsonl both phases' train/eval records, ``global_step`` continuing across
    OUT/boundary.json          the boundary summary (also printed and in OUT/summary.txt)
    OUT/samples.txt            greedy samples after each phase
    OUT/transition.png         train/val loss of both phases against the global step

Phase 2 starts with gating noise off (``model.moe.noise_start_step >= 1``) and
evaluates the upcycled model before its first update, so the first phase-2
loss and the step-0 validation loss measure the conversion, not the noise.
Re-running the same command resumes whichever phase was interrupted.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from ..config import ConfigError, RunConfig, from_dict, to_dict
from ..train.callbacks import Callback


def phase_configs(cfg: RunConfig) -> tuple[RunConfig, RunConfig]:
    """(phase-1 dense config, phase-2 MoE config) from a transition config (``model.ffn: moe``)."""
    if cfg.model.ffn not in ("moe", "dense"):
        raise ConfigError(f"somoe transition goes dense -> moe; model.ffn={cfg.model.ffn} is neither; "
                          f"use a transition preset (e.g. cpu_transition)")
    data = to_dict(cfg)
    data["model"]["ffn"] = "dense"
    data["name"] = f"{cfg.name}-dense"
    dense = from_dict(RunConfig, data)
    t = cfg.transition
    data = to_dict(cfg)
    moe = data["model"]["moe"]
    data["model"]["ffn"] = "moe"
    data["name"] = f"{cfg.name}-moe"
    moe["noise_start_step"] = max(moe["noise_start_step"], 1)  # the boundary step is noise-free
    train = data["train"]
    train["seed"] = cfg.train.seed + 1  # other batches than phase 1's first ones (batches are f(seed, step))
    if t.moe_steps:
        train["max_steps"] = t.moe_steps
    if t.moe_lr:
        train["lr"] = t.moe_lr
    train["warmup_steps"] = t.moe_warmup_steps
    if t.moe_schedule != "same":
        train["schedule"] = t.moe_schedule
    moe_cfg = from_dict(RunConfig, data)
    from .upcycle import check_upcyclable

    check_upcyclable(dense, moe_cfg)
    return dense, moe_cfg


def link_checkpoint(src: Path, dst: Path) -> Path:
    """``dst`` := a copy of checkpoint folder ``src`` made of hard links (files are never rewritten in place)."""
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in src.iterdir():
        try:
            os.link(f, tmp / f.name)
        except OSError:  # another file system
            shutil.copy2(f, tmp / f.name)
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)
    return dst


class FirstStep(Callback):
    """Keeps the metrics of a run's first optimizer step (the boundary loss) in a JSON file."""

    def __init__(self, path: Path):
        self.path = path

    def on_step_end(self, trainer, metrics) -> None:
        if trainer.step == 1 and trainer.dist.is_main:  # a compiled step's metrics may still be on the device
            from ..train.trainer import read_metrics

            self.path.write_text(json.dumps(read_metrics(metrics)), encoding="utf-8")


def greedy_samples(model, tokenizer, cfg: RunConfig) -> list[tuple[str, str]]:
    from ..generate.sampling import GenerationConfig, generate_text

    t = cfg.transition
    gen = GenerationConfig(max_new_tokens=t.sample_tokens, greedy=True)
    return list(zip(t.sample_prompts, generate_text(model, tokenizer, list(t.sample_prompts), gen)))


def write_history(out: Path, dense_steps: int) -> list[dict]:
    """Both phases' records in one file; phase 2's ``global_step`` continues after phase 1's."""
    from ..report.summary import read_records

    history = []
    first = out / "moe" / "first_step.json"
    for phase, offset in (("dense", 0), ("moe", dense_steps)):
        records = read_records(out / phase)
        if phase == "moe" and first.is_file() and not any(r.get("kind") == "train" and r["step"] == 1
                                                          for r in records):
            records.insert(0, {"kind": "train", **json.loads(first.read_text(encoding="utf-8"))})
        for r in records:
            history.append({"phase": phase, "global_step": r.get("step", 0) + offset, **r})
    (out / "training_history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history), encoding="utf-8")
    return history


def boundary_summary(history: list[dict], verification: dict | None) -> dict[str, Any]:
    """Seed 004's boundary figures (train losses, one batch each) plus the same-data validation jump."""
    def last(phase, kind, key):
        rows = [r for r in history if r["phase"] == phase and r.get("kind") == kind and key in r]
        return rows[-1][key] if rows else None

    moe_train = [r for r in history if r["phase"] == "moe" and r.get("kind") == "train"]
    moe_eval = [r for r in history if r["phase"] == "moe" and r.get("kind") == "eval"]
    s: dict[str, Any] = {
        "phase1_final_loss": last("dense", "train", "loss"),
        "phase2_first_loss": moe_train[0]["loss"] if moe_train and moe_train[0]["step"] == 1 else None,
        "phase2_final_loss": last("moe", "train", "loss"),
        "dense_val_loss": last("dense", "eval", "val_loss"),
        "moe_init_val_loss": moe_eval[0]["val_loss"] if moe_eval and moe_eval[0]["step"] == 0 else None,
        "moe_final_val_loss": last("moe", "eval", "val_loss"),
    }
    if s["phase1_final_loss"] is not None and s["phase2_first_loss"] is not None:
        s["boundary_jump"] = s["phase2_first_loss"] - s["phase1_final_loss"]
    if s["phase2_first_loss"] is not None and s["phase2_final_loss"] is not None:
        s["phase2_drop"] = s["phase2_first_loss"] - s["phase2_final_loss"]
    if s["dense_val_loss"] is not None and s["moe_init_val_loss"] is not None:
        s["val_jump"] = s["moe_init_val_loss"] - s["dense_val_loss"]
    if s["moe_init_val_loss"] is not None and s["moe_final_val_loss"] is not None:
        s["phase2_val_drop"] = s["moe_init_val_loss"] - s["moe_final_val_loss"]
    if verification is not None:
        s["verification_max_diff"] = verification["max_diff"]
    return s


def format_summary(s: dict[str, Any]) -> str:
    def f(key):
        return "n/a" if s.get(key) is None else f"{s[key]:.4f}"

    lines = ["BOUNDARY SUMMARY",
             f"  phase 1 final loss  : {f('phase1_final_loss')}   (train batch, last dense step)",
             f"  phase 2 first loss  : {f('phase2_first_loss')}   (train batch, first MoE step, noise off)",
             f"  boundary jump       : {f('boundary_jump')}   (different batches: batch noise, not the conversion)",
             f"  phase 2 final loss  : {f('phase2_final_loss')}",
             f"  phase 2 total drop  : {f('phase2_drop')}",
             f"  val loss dense final: {f('dense_val_loss')} | MoE init: {f('moe_init_val_loss')} | "
             f"jump {f('val_jump')} (same data: the conversion itself)",
             f"  val loss MoE final  : {f('moe_final_val_loss')} | phase 2 val drop {f('phase2_val_drop')}"]
    if s.get("verification_max_diff") is not None:
        lines.append(f"  verification        : max |logit diff| {s['verification_max_diff']:.2e} (fp32)")
    return "\n".join(lines)


def plot_history(out: Path, history: list[dict], boundary_step: int) -> Path:
    """Train and validation loss of both phases against the global step, the boundary marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, phase in enumerate(("dense", "moe")):
        train = [r for r in history if r["phase"] == phase and r.get("kind") == "train"]
        evals = [r for r in history if r["phase"] == phase and r.get("kind") == "eval"]
        ax.plot([r["global_step"] for r in train], [r["loss"] for r in train], color=f"C{i}", alpha=0.6,
                label=f"{phase} train")
        ax.plot([r["global_step"] for r in evals], [r["val_loss"] for r in evals], "o--", color=f"C{i}",
                label=f"{phase} val")
    ax.axvline(boundary_step, color="grey", linestyle=":", label="upcycling")
    ax.set(xlabel="optimizer step (both phases)", ylabel="loss (nats/token)", title="dense -> MoE transition")
    ax.legend()
    fig.tight_layout()
    path = out / "transition.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _banner(log, title: str) -> None:
    log("=" * 64)
    log(f"  {title}")
    log("=" * 64)


def run_transition(cfg: RunConfig, out: str | Path, progress: bool = True, log=print) -> int:
    """Both phases and the conversion between them; returns an exit code (1: verification failed)."""
    from ..train.checkpoint import list_checkpoints
    from ..train.stopping import stop_code
    from ..train.trainer import Trainer
    from .upcycle import probe_from_stream, save_upcycled, upcycle_model, verify

    out = Path(out)
    dense_cfg, moe_cfg = phase_configs(cfg)
    samples: dict[str, list[tuple[str, str]]] = {}

    _banner(log, f"PHASE 1 - dense ({dense_cfg.train.max_steps or 'epochs'} steps, lr {dense_cfg.train.lr:g})")
    phase1 = Trainer(dense_cfg, out / "dense", resume="auto", progress=progress, log=log)
    log(f"  params {phase1.model.param_counts()}")
    if phase1.step < phase1.total_steps:  # a finished phase is not evaluated again on a rerun
        phase1.fit()
    if phase1.step < phase1.total_steps and dense_cfg.train.max_minutes <= 0:
        log(f"phase 1 stopped at step {phase1.step}; rerun the same command to resume")
        return stop_code(phase1) or 130
    link_checkpoint(list_checkpoints(out / "dense")[-1], out / "checkpoints" / "dense")
    samples["dense"] = greedy_samples(phase1.model, phase1.data.tokenizer, cfg)

    moe_dir, verification = out / "moe", None
    E, K = moe_cfg.model.moe.num_experts, moe_cfg.model.moe.top_k
    _banner(log, f"TRANSITION - dense -> MoE upcycling ({E} experts, top-{K})")
    if not list_checkpoints(moe_dir):
        moe = upcycle_model(phase1.model, moe_cfg)
        probe = probe_from_stream(phase1.data.val, dense_cfg.data.seq_len, cfg.transition.probe_sequences,
                                  phase1.data.tokenizer.pad_id)
        result = verify(phase1.model, moe, probe, cfg.transition.tolerance)
        for line in result.lines():
            log(line)
        if not result.passed:
            log(f"the upcycled model differs from the dense one by more than {cfg.transition.tolerance:g}: "
                f"nothing written, phase 2 not started")
            return 1
        verification = result.as_dict()
        moe_init = save_upcycled(moe_dir, moe, moe_cfg, out / "dense" / "tokenizer.json",
                                 {"dense_checkpoint": str(out / "checkpoints" / "dense"), **verification})
        link_checkpoint(moe_init, out / "checkpoints" / "moe_init")
        del moe
    else:
        saved = moe_dir / "upcycle.json"
        verification = json.loads(saved.read_text(encoding="utf-8")) if saved.is_file() else None
        log(f"  {moe_dir} exists: resuming phase 2")
    dense_steps = phase1.total_steps
    del phase1  # the dense model, its optimizer state and data are not needed in phase 2

    t = moe_cfg.train
    _banner(log, f"PHASE 2 - MoE ({t.max_steps or 'epochs'} steps, lr {t.lr:g}, {E} experts top-{K})")
    phase2 = Trainer(moe_cfg, moe_dir, resume="auto", progress=progress, log=log,
                     callbacks=[FirstStep(moe_dir / "first_step.json")])
    log(f"  params {phase2.model.param_counts()}")
    if phase2.step == 0:
        phase2.run_eval()  # the upcycled model on the same validation data as phase 1's last eval
    if phase2.step < phase2.total_steps:
        phase2.fit()
    if phase2.step < phase2.total_steps and t.max_minutes <= 0:
        log(f"phase 2 stopped at step {phase2.step}; rerun the same command to resume")
        return stop_code(phase2) or 130
    link_checkpoint(list_checkpoints(moe_dir)[-1], out / "checkpoints" / "moe_final")
    samples["moe"] = greedy_samples(phase2.model, phase2.data.tokenizer, cfg)

    from ..report.summary import write_report

    for phase in ("dense", "moe"):
        write_report(out / phase)  # each phase's summary.txt and metrics.png
    history = write_history(out, dense_steps)
    plot_history(out, history, dense_steps)
    summary = boundary_summary(history, verification)
    (out / "boundary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    text = [format_summary(summary)]
    for phase, rows in samples.items():
        text.append(f"\ngreedy samples after phase {'1 (dense)' if phase == 'dense' else '2 (MoE)'}:")
        text += [f"  {prompt!r} -> {cont!r}" for prompt, cont in rows]
    (out / "samples.txt").write_text("\n".join(text[1:]).strip() + "\n", encoding="utf-8")
    (out / "summary.txt").write_text("\n".join(text) + "\n", encoding="utf-8")
    log("\n".join(text))
    return 0
