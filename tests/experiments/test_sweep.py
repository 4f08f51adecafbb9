"""somoe sweep: shipped sweeps resolve; a sweep resumes after an interruption without redoing finished runs."""

from __future__ import annotations

import functools
import json

import pytest
import yaml
from helpers import TINY

from somoe.cli import main
from somoe.config import ConfigError
from somoe.experiments.sweeps import list_sweeps, load_sweep, run_status, run_sweep
from somoe.experiments.sweeps.runner import train_run
from somoe.train.callbacks import Callback


def test_shipped_sweeps_cover_ablations_a_b_d_and_resolve():
    names = list_sweeps()
    for ablation in ("a", "b", "d"):
        assert {f"ablation_{ablation}_cpu", f"ablation_{ablation}_gpu"} <= set(names)
    for name in names:
        sweep = load_sweep(name)
        configs = [sweep.run_config(run) for run in sweep.runs]  # every run's config validates
        assert len({c.name for c in configs}) == len(configs) >= 3
    b = load_sweep("ablation_b_cpu")
    widths = [sweep_cfg.model.d_model for sweep_cfg in (b.run_config(r) for r in b.runs)]
    experts = {b.run_config(r).model.some.num_experts for r in b.runs}
    assert widths == [128, 160, 192] and experts == {32}  # B: backbone varies, experts fixed


def test_grid_expands_to_the_cartesian_product(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump({"preset": "debug", "grid": {"train.lr": [0.001, 0.002],
                                                                 "model.n_layers": [1, 2, 3]}}, sort_keys=False))
    sweep = load_sweep(str(path))
    assert len(sweep.runs) == 6
    assert sweep.runs[0].name == "lr=0.001,n_layers=1"
    assert {(c.train.lr, c.model.n_layers) for c in (sweep.run_config(r) for r in sweep.runs)} == {
        (lr, n) for lr in (0.001, 0.002) for n in (1, 2, 3)}


@pytest.mark.parametrize("body, message", [
    ({"runs": {"a": []}}, "exactly one base"),
    ({"preset": "debug"}, "defines no runs"),
    ({"preset": "debug", "runs": {"a": ["train.lr"]}}, "key=value"),
    ({"preset": "debug", "runs": {"a": []}, "bogus": 1}, "unknown sweep key"),
])
def test_bad_sweep_files_are_one_line_errors(tmp_path, body, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(body))
    with pytest.raises(ConfigError, match=message):
        load_sweep(str(path))
    assert main(["sweep", "no_such_sweep"]) == 2


class StopAt(Callback):
    """Simulates Ctrl-C in one run: the trainer saves a checkpoint and stops, as on SIGINT."""

    def __init__(self, run: str, step: int):
        self.run, self.step = run, step

    def on_step_end(self, trainer, metrics):
        if trainer.run_dir.name == self.run and trainer.step == self.step:
            trainer._stop_signal = "SIGINT"


class Record(Callback):
    def __init__(self):
        self.starts: list[tuple[str, int]] = []

    def on_train_start(self, trainer):
        self.starts.append((trainer.run_dir.name, trainer.step))


def test_sweep_resumes_after_interruption_without_redoing_finished_runs(tmp_path, data_cache):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({
        "name": "tiny", "preset": "debug", "overrides": TINY + [f"data.cache_dir={data_cache}"],
        "runs": {"a": ["train.lr=3e-3"], "b": ["train.lr=2e-3"], "c": ["train.lr=1e-3"]}}))
    sweep, out, quiet = load_sweep(str(path)), tmp_path / "out", (lambda *_: None)

    first = Record()
    interrupted = functools.partial(train_run, callbacks=[StopAt("b", 3), first])
    assert run_sweep(sweep, out, train=interrupted, log=quiet) is False
    assert first.starts == [("a", 0), ("b", 0)]
    assert [run_status(out / r)[:2] for r in "abc"] == [("done", 6), ("partial", 3), ("new", 0)]
    a_metrics = (out / "a" / "metrics.jsonl").read_bytes()
    a_ckpt_mtime = (out / "a" / "checkpoints" / "step-00000006" / "model.safetensors").stat().st_mtime_ns

    second = Record()
    assert run_sweep(sweep, out, train=functools.partial(train_run, callbacks=[second]), log=quiet) is True
    assert second.starts == [("b", 3), ("c", 0)]  # a skipped, b resumed where it stopped, c fresh
    assert (out / "a" / "metrics.jsonl").read_bytes() == a_metrics
    assert (out / "a" / "checkpoints" / "step-00000006" / "model.safetensors").stat().st_mtime_ns == a_ckpt_mtime
    b_steps = [json.loads(line)["step"] for line in (out / "b" / "metrics.jsonl").read_text().splitlines()
               if json.loads(line)["kind"] == "train"]
    assert b_steps == [1, 2, 3, 4, 5, 6]  # the resumed run logs every step once
    table = (out / "compare" / "compare.md").read_text()
    assert all(f"\n{r} " in table for r in "abc") and (out / "compare" / "compare.png").stat().st_size > 10_000

    third = Record()
    assert run_sweep(sweep, out, train=functools.partial(train_run, callbacks=[third]), log=quiet) is True
    assert third.starts == []

    changed = tmp_path / "s2.yaml"  # same run folders, different settings: refused, not silently resumed
    changed.write_text(path.read_text().replace("train.lr=3e-3", "train.lr=5e-3"))
    with pytest.raises(ConfigError, match="different config"):
        run_sweep(load_sweep(str(changed)), out, log=quiet)
