"""Output folders of a verb: checked before any work, created once, removed again if the verb fails.

:func:`new_output` refuses an output path that is a file, sits under a file or cannot be created, in
one line naming the flag, and creates it. It notes on ``args`` the topmost folder it created, so that
``cli.main`` removes that folder when the verb then fails (:func:`remove_new_outputs`): a failed
command leaves nothing behind. A folder that holds a checkpoint or training records is kept: it is
a run that a rerun resumes, or the record of a crash mid-training.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ..config import ConfigError

_NEW = "_new_outputs"


def check_output(path: str | Path, flag: str) -> Path:
    """Refuse ``path`` as an output folder if it is a file or a parent of it is a file; returns it."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{flag} {path} is a file, not a folder; choose another {flag}")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"{flag} {path}: {parent} is a file, not a folder; choose another {flag}")
            break
    return path


def new_output(args, path: str | Path, flag: str = "--out") -> Path:
    """Check and create output folder ``path``; it is removed again if the command fails."""
    path = check_output(path, flag)
    top = next((p for p in reversed([path, *path.parents]) if not p.exists()), None)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"{flag} {path} cannot be created ({err.strerror}: {err.filename}); "
                          f"choose a folder you can write to") from None
    if top is not None:
        getattr(args, _NEW, None) or setattr(args, _NEW, [])
        getattr(args, _NEW).append(top)
    return path


def _holds_a_run(folder: Path) -> bool:
    return any(folder.rglob("step-*/model.safetensors")) or any(f.stat().st_size for f in folder.rglob("metrics.jsonl"))


def remove_new_outputs(args) -> None:
    """Remove the output folders this command created, unless they hold a run (checkpoints, records)."""
    for top in getattr(args, _NEW, None) or []:
        if top.is_dir() and not _holds_a_run(top):
            shutil.rmtree(top, ignore_errors=True)
