"""Loading sweep files and running them: sequential, resumable, one run folder per grid point.

Resumability rests on the trainer's own checkpoints: a run folder whose newest
loadable checkpoint has reached its ``total_steps`` is finished and skipped; an
unfinished one is resumed with ``resume='auto'`` (exactly, from its last
checkpoint); a missing one starts fresh. A run folder trained with another
config is refused rather than silently resumed with different settings.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable

import yaml

from ...config import ConfigError, RunConfig, from_dict, load_config, load_yaml

SWEEP_PACKAGE = "somoe.experiments.sweeps"
_NAME = re.compile(r"[^A-Za-z0-9_.,=+-]+")  # run folder names: no slashes, spaces, quotes


@dataclass
class SweepRun:
    name: str
    overrides: list[str]


@dataclass
class Sweep:
    name: str
    description: str = ""
    preset: str | None = None
    config: str | None = None
    overrides: list[str] = field(default_factory=list)
    runs: list[SweepRun] = field(default_factory=list)
    scaling: str | None = None  # a dotted config key: figures against its value (analysis/scaling.py)

    def run_config(self, run: SweepRun, extra: list[str] = ()) -> RunConfig:
        """The resolved config of one run: base, sweep overrides, the run's, then the command line's."""
        overrides = [f"name={run.name}", *self.overrides, *run.overrides, *extra]
        return load_config(preset=None if self.config else self.preset, config_file=self.config,
                           overrides=overrides)


def list_sweeps() -> list[str]:
    root = resources.files(SWEEP_PACKAGE)
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def _as_overrides(value, where: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) and "=" in v for v in value):
        raise ConfigError(f"{where} must be a list of 'key=value' strings, e.g. [train.max_steps=200]")
    return list(value)


def _grid_runs(grid) -> list[SweepRun]:
    if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        raise ConfigError("sweep 'grid' must map each dotted key to a non-empty list of values")
    keys = list(grid)
    runs = []
    for values in itertools.product(*(grid[k] for k in keys)):
        dumped = [yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip() for v in values]
        name = ",".join(f"{k.split('.')[-1]}={d}" for k, d in zip(keys, dumped))
        runs.append(SweepRun(_NAME.sub("_", name), [f"{k}={d}" for k, d in zip(keys, dumped)]))
    return runs


def _read_yaml(path: Path):
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"sweep file {path} is not text (binary or not UTF-8); pass a sweep YAML file") from None
    if not text.strip():
        raise ConfigError(f"sweep file {path} is empty; give a preset and runs or a grid (see `somoe sweep --list`)")
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        line = getattr(getattr(err, "problem_mark", None), "line", None)
        where = f" at line {line + 1}" if line is not None else ""
        raise ConfigError(f"sweep file {path} is not valid YAML{where}; fix the syntax") from None


def load_sweep(name_or_path: str) -> Sweep:
    """A shipped sweep by name (``somoe sweep --list``) or a sweep YAML file."""
    path = Path(name_or_path)
    if not path.is_file():
        shipped = Path(str(resources.files(SWEEP_PACKAGE).joinpath(f"{name_or_path}.yaml")))
        if not shipped.is_file():
            raise ConfigError(f"sweep '{name_or_path}' is neither a file nor a shipped sweep; shipped: "
                              f"{', '.join(list_sweeps())}")
        path = shipped
    data = _read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must be a YAML mapping with preset, overrides, runs and/or grid")
    unknown = set(data) - {"name", "description", "preset", "config", "overrides", "runs", "grid", "scaling"}
    if unknown:
        raise ConfigError(f"{path}: unknown sweep key(s) {sorted(unknown)}; allowed: name, description, preset, "
                          f"config, overrides, runs, grid, scaling")
    if bool(data.get("preset")) == bool(data.get("config")):
        raise ConfigError(f"{path}: give exactly one base, 'preset: NAME' or 'config: FILE'")
    config = data.get("config")
    if config and not Path(config).is_absolute():
        config = str(path.parent / config)
    runs = [SweepRun(_NAME.sub("_", str(n)), _as_overrides(o, f"{path}: runs.{n}"))
            for n, o in (data.get("runs") or {}).items()]
    if data.get("grid"):
        runs += _grid_runs(data["grid"])
    if not runs:
        raise ConfigError(f"{path} defines no runs; add a 'runs:' mapping or a 'grid:'")
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: run names repeat ({names}); give every run its own name")
    return Sweep(str(data.get("name") or path.stem), str(data.get("description") or ""), data.get("preset"),
                 config, _as_overrides(data.get("overrides"), f"{path}: overrides"), runs,
                 str(data["scaling"]) if data.get("scaling") else None)


def run_status(run_dir: Path) -> tuple[str, int, int]:
    """('new' | 'partial' | 'done', step reached, total steps) from the run folder's checkpoints."""
    from ...train.checkpoint import find_resumable, read_trainer_state

    ckpt = find_resumable(run_dir, log=lambda *_: None) if run_dir.is_dir() else None
    if ckpt is None:
        return "new", 0, 0
    state = read_trainer_state(ckpt)
    step, total = int(state.get("step", 0)), int(state.get("total_steps", 0))
    return ("done" if total and step >= total else "partial"), step, total


def check_same_config(run_dir: Path, cfg: RunConfig) -> None:
    saved = run_dir / "config.yaml"
    if saved.is_file() and from_dict(RunConfig, load_yaml(saved)) != cfg:
        raise ConfigError(f"run folder {run_dir} was trained with a different config than the sweep now gives; "
                          f"delete it, or rename the run in the sweep file")


def train_run(cfg: RunConfig, run_dir: Path, log: Callable[[str], None] = print, callbacks=()) -> bool:
    """Train (or resume) one run to the end; False when a signal stopped it."""
    from ...report.summary import write_report
    from ...train.trainer import Trainer

    trainer = Trainer(cfg, run_dir, resume="auto", progress=False, log=log, callbacks=list(callbacks))
    from ...train.stopping import stop_code

    trainer.fit()
    write_report(run_dir)
    return stop_code(trainer) is None


def run_sweep(sweep: Sweep, out: str | Path, extra: list[str] = (), train: Callable = train_run,
              log: Callable[[str], None] = print) -> bool:
    """Train every run of ``sweep`` under ``out`` in order, then write ``out/compare``; False if interrupted."""
    from ...analysis.compare import compare_runs

    out = Path(out)
    configs = [(run, sweep.run_config(run, list(extra))) for run in sweep.runs]  # all errors before any training
    for run, cfg in configs:
        run_dir = out / run.name
        state, step, total = run_status(run_dir)
        check_same_config(run_dir, cfg)
        if state == "done":
            log(f"[{sweep.name}] {run.name}: finished ({step}/{total} steps), skipped")
            continue
        log(f"[{sweep.name}] {run.name}: {'resuming at step ' + str(step) if state == 'partial' else 'starting'} "
            f"-> {run_dir}")
        if not train(cfg, run_dir, log=log):
            log(f"[{sweep.name}] interrupted in {run.name}; run the same command again to resume")
            return False
    table = compare_runs([out / run.name for run, _ in configs], out / "compare", title=sweep.name)
    log(table)
    if sweep.scaling:
        from ...analysis.scaling import scaling_report

        log(scaling_report([out / run.name for run, _ in configs], sweep.scaling, out / "compare"))
    log(f"[{sweep.name}] report: {out / 'compare' / 'compare.md'}")
    return True
