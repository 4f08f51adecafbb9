"""The JSON side of ``scripts/gpu_check.sh``; every reader tolerates missing, empty and torn files.

    python3 scripts/gpu_summary.py rows PART STEP   # a step's output -> JSON lines for rows.jsonl, on stdout
    python3 scripts/gpu_summary.py summary OUT      # runs.json from OUT/run_*, then one line per row and step
"""

from __future__ import annotations

import json
import math
import pathlib
import sys

KEYS = ("impl", "preset", "mode", "path", "dtype", "num_experts", "top_k", "ops", "graph_breaks", "recompiles",
        "compile_s", "ms", "ms_p90", "tokens_per_s", "ratio", "speedup_vs_transformers", "mfu", "peak_mem_gib",
        "peak_source", "passed", "failed", "missing", "rc", "seconds", "note")


def _objects(text: str) -> list[dict]:
    """The rows of a ``{"rows": [...]}`` document, or every line that is a JSON object."""
    try:
        doc = json.loads(text)
        if isinstance(doc, dict):
            return [dict(r) for r in doc.get("rows", [])] if "rows" in doc else [doc]
    except ValueError:
        pass
    found = []
    for line in text.splitlines():
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict):
            found.append(obj)
    return found


def rows(part: str, step: str) -> None:
    path = pathlib.Path(part)
    text = path.read_text(errors="replace") if path.is_file() else ""
    for obj in _objects(text):
        obj.setdefault("step", step)
        print(json.dumps(obj))


def _runs(out: pathlib.Path) -> list[dict]:
    """Seconds per 1,000 steps from each run's later train records, and the seed schedule's hours."""
    import yaml

    found = []
    for run_dir in sorted(out.glob("run_*")):
        try:
            records = _objects((run_dir / "metrics.jsonl").read_text(errors="replace"))
            cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
        except (OSError, ValueError, yaml.YAMLError) as err:
            print(f"runs {run_dir.name}: unreadable ({type(err).__name__})")
            continue
        train = [r for r in records if r.get("kind") == "train"]
        evals = [r for r in records if r.get("kind") == "eval"]
        if not train:
            print(f"runs {run_dir.name}: no train records")
            continue
        half = max(r["step"] for r in train) // 2
        late = [r for r in train if r["step"] > half]
        if len(late) < 2:
            print(f"runs {run_dir.name}: too few train records past step {half}")
            continue
        s_per_step = (late[-1]["elapsed"] - late[0]["elapsed"]) / (late[-1]["step"] - late[0]["step"])
        t = cfg["train"]
        steps_20k = math.ceil(20000 / t["batch_size"]) * t["epochs"]  # the seed's 20,000 stories, one per row
        found.append({"run": run_dir.name, "steps": late[-1]["step"], "s_per_1000_steps": 1000 * s_per_step,
                      "tokens_per_s": late[-1].get("tok_per_s"), "seed_schedule_steps": steps_20k,
                      "projected_hours": steps_20k * s_per_step / 3600,
                      "val_bpb": [(e["step"], e.get("val_bpb")) for e in evals], "resumed": len(evals) >= 2})
    return found


def _fmt(r: dict, keys) -> str:
    return " ".join(f"{k}={r[k]:.4g}" if isinstance(r.get(k), float) else f"{k}={r.get(k)}" for k in keys if k in r)


def summary(out_dir: str) -> None:
    out = pathlib.Path(out_dir)
    runs = _runs(out)
    (out / "runs.json").write_text(json.dumps({"rows": runs}, indent=1))
    for r in runs:
        print("runs", _fmt(r, r.keys()))
    path = out / "rows.jsonl"
    all_rows = _objects(path.read_text(errors="replace")) if path.is_file() else []
    steps = [r for r in all_rows if "rc" in r and "bench" not in r]
    for r in all_rows:
        if r not in steps:
            print(r.get("step", "?"), _fmt(r, KEYS))
    for r in steps:
        print("step", r.get("step"), _fmt(r, ("rc", "seconds", "note")))
    failed = [r["step"] for r in steps if r.get("rc") not in (0,)]
    print(f"summary: {len(all_rows) - len(steps)} rows, {len(steps)} steps, not ok: {', '.join(map(str, failed)) or 'none'}")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "rows":
        rows(sys.argv[2], sys.argv[3])
    elif len(sys.argv) == 3 and sys.argv[1] == "summary":
        summary(sys.argv[2])
    else:
        sys.exit(__doc__)
