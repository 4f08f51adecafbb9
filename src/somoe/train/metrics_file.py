"""Reading ``metrics.jsonl``: one JSON record per line, appended as training goes.

A kill -9 (or a full disk) in the middle of an append leaves a torn last line; it is
skipped with a warning instead of blocking resume and reports.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _warn(message: str) -> None:
    print(message, file=sys.stderr)


def read_jsonl(path: Path, log=_warn) -> list[dict]:
    """Every record of ``path`` in order ([] without the file); undecodable lines are skipped with a warning."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            where = "its last line" if number == len(lines) else f"line {number}"
            log(f"warning: {path}: skipping {where}, which is not a complete JSON record (an interrupted write)")
    return records
