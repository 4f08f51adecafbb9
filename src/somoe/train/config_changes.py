"""A resumed run whose config differs from its checkpoint's: refuse, or record the change.

A resume never mixes data sets or models: a change to what the checkpoints were trained on (the
data source, the tokenizer, the model's shape: every ``data.*`` and ``model.*`` key) is refused in
one line naming the changed keys, unless each is named with ``--allow-config-change KEY`` (then it
is recorded like any other change). Schedule keys (``SCHEDULE_KEYS``: step budget, eval, checkpoint
and logging cadence) change silently; other training settings (learning rate, device, precision...)
change with a warning. Every change made at a resume is appended to ``config_history.jsonl`` (step,
and old -> new per dotted key), so ``config.yaml`` plus the history say which settings produced
which part of the curve.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..config import ConfigError, RunConfig, to_dict

HISTORY_FILE = "config_history.jsonl"
SCHEDULE_KEYS = frozenset({"name", "description", "train.max_steps", "train.epochs", "train.max_minutes",
                           "train.eval_every", "train.ckpt_every", "train.keep_last", "train.log_every",
                           "train.sample_every_eval"})
# what the checkpoints were trained on; data.cache_dir only says where the token cache lives
GUARDED_PREFIXES = ("data.", "model.")
NOT_GUARDED = frozenset({"data.cache_dir"})


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def config_changes(old: RunConfig, new: RunConfig) -> dict[str, list]:
    """Dotted key -> [old value, new value] for every setting that differs."""
    before, after = _flatten(to_dict(old)), _flatten(to_dict(new))
    return {k: [before.get(k), after.get(k)] for k in sorted(set(before) | set(after)) if before.get(k) != after.get(k)}


def guarded(key: str) -> bool:
    return key.startswith(GUARDED_PREFIXES) and key not in NOT_GUARDED


def check_resume_config(run_dir: Path, checkpoint: Path, new: RunConfig, allow: tuple[str, ...] = ()) -> None:
    """Refuse a resume from ``checkpoint`` that changes the data, tokenizer or model it was trained on.
    A step-0 checkpoint (an imported or upcycled model) has seen no data of this run: any may follow."""
    from .checkpoint import load_config_from, read_trainer_state

    if int(read_trainer_state(checkpoint).get("step", 0)) == 0:
        return
    old = load_config_from(checkpoint)
    refused = {k: v for k, v in config_changes(old, new).items() if guarded(k) and k not in allow}
    if refused:
        shown = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in refused.items())
        flags = " ".join(f"--allow-config-change {k}" for k in refused)
        raise ConfigError(f"run folder {run_dir} was trained on other data or another model ({shown}); resuming would "
                          f"mix them: choose a new --out, or pass {flags} to continue anyway")


def precheck_resume_config(run_dir: Path, resume: str | None, new: RunConfig, allow: tuple[str, ...] = ()) -> None:
    """:func:`check_resume_config` against the newest checkpoint, before the run's lock file is written,
    so that a refused resume changes no file (the trainer checks again, under the lock)."""
    from .checkpoint import list_checkpoints, load_config_from, read_trainer_state

    if resume in (None, "", "never"):
        return
    candidates = [Path(resume)] if resume != "auto" else list_checkpoints(Path(run_dir))[::-1]
    for ckpt in candidates:
        try:
            load_config_from(ckpt), read_trainer_state(ckpt)
        except Exception:  # noqa: BLE001 - unreadable: the trainer's own resume reports or skips it
            continue
        check_resume_config(run_dir, ckpt, new, allow)
        return


def record_config_changes(run_dir: Path, old: RunConfig, new: RunConfig, step: int, log) -> dict[str, list]:
    """Warn about and append to the history the settings a resume at ``step`` changes; returns them."""
    changes = config_changes(old, new)
    if changes:
        loud = {k: v for k, v in changes.items() if k not in SCHEDULE_KEYS}  # schedule changes are routine
        if loud:
            shown = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in loud.items())
            log(f"warning: resuming at step {step} with a changed config ({shown}); recorded in {HISTORY_FILE}")
        with open(Path(run_dir) / HISTORY_FILE, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"step": step, "changes": changes}) + "\n")
    return changes
