"""A resumed run whose config differs from its checkpoint's: warn, and keep the history.

``config.yaml`` always holds the config the run is training with now; each change made at a
resume is appended to ``config_history.jsonl`` (step, and old -> new per dotted key), so the
run folder still says which settings produced which part of the curve.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..config import RunConfig, to_dict

HISTORY_FILE = "config_history.jsonl"


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


def record_config_changes(run_dir: Path, old: RunConfig, new: RunConfig, step: int, log) -> dict[str, list]:
    """Warn about and append to the history the settings a resume at ``step`` changes; returns them."""
    changes = config_changes(old, new)
    if changes:
        shown = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items())
        log(f"warning: resuming at step {step} with a changed config ({shown}); recorded in {HISTORY_FILE}")
        with open(Path(run_dir) / HISTORY_FILE, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"step": step, "changes": changes}) + "\n")
    return changes
