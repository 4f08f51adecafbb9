"""A resume never mixes data sets or models: changed data/tokenizer/model keys are refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import TINY, shipped_stories
from somoe.cli import main
from somoe.experiments.quickstart import main_job_folder
from somoe.train.config_changes import HISTORY_FILE


def tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def finished_run(tmp_path, data_cache):
    run = tmp_path / "run"
    args = ["train", "--preset", "debug", "--out", str(run), "--no-progress", *TINY, f"data.cache_dir={data_cache}",
            "train.max_steps=2", "train.eval_every=0"]
    assert main(args) == 0
    return run, args


@pytest.fixture
def other_stories(tmp_path):
    folder = tmp_path / "other"
    folder.mkdir()
    (folder / "train.txt").write_text("\n<|endoftext|>\n".join(shipped_stories(120, 200)), encoding="utf-8")
    (folder / "dev.txt").write_text("\n<|endoftext|>\n".join(shipped_stories(20, 400)), encoding="utf-8")
    return folder


def test_a_resume_on_other_data_is_refused_and_changes_nothing(finished_run, other_stories, capsys):
    run, args = finished_run
    before = tree(run)
    capsys.readouterr()
    code = main([*args, "--resume", "auto", f"data.train_path={other_stories / 'train.txt'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert "data.train_path: '' -> " in err and "--allow-config-change data.train_path" in err
    assert "choose a new --out" in err
    assert tree(run) == before  # config.yaml still describes what the checkpoints were trained on


def test_a_model_shape_change_names_each_key(finished_run, capsys):
    run, args = finished_run
    capsys.readouterr()
    assert main([*args, "--resume", "auto", "model.d_model=64", "model.n_heads=8"]) == 2
    err = capsys.readouterr().err
    assert "model.d_model: 32 -> 64" in err and "model.n_heads: 4 -> 8" in err


def test_schedule_keys_change_silently_and_are_recorded(finished_run, capsys):
    run, args = finished_run
    capsys.readouterr()
    assert main([*args, "--resume", "auto", "train.max_steps=3", "train.log_every=2"]) == 0
    out = capsys.readouterr().out
    assert "warning" not in out and "resumed from" in out
    history = [json.loads(line) for line in (run / HISTORY_FILE).read_text().splitlines()]
    assert history == [{"step": 2, "changes": {"train.log_every": [1, 2], "train.max_steps": [2, 3]}}]


def test_allow_config_change_lets_a_named_key_through(finished_run, capsys):
    run, args = finished_run
    capsys.readouterr()
    code = main([*args, "--resume", "auto", "--allow-config-change", "model.dropout", "model.dropout=0.1",
                 "train.max_steps=3"])
    assert code == 0, capsys.readouterr().err
    history = [json.loads(line) for line in (run / HISTORY_FILE).read_text().splitlines()]
    assert history[-1]["changes"]["model.dropout"] == [0.0, 0.1]
    assert "dropout: 0.1" in (run / "config.yaml").read_text()


def test_the_main_job_folder_names_its_data(tmp_path):
    assert main_job_folder(None) == Path("runs/main_job/builtin")
    a, b = tmp_path / "a" / "stories", tmp_path / "b" / "stories"
    assert main_job_folder(str(a)).parent == Path("runs/main_job")
    assert main_job_folder(str(a)).name.startswith("stories-")
    assert main_job_folder(str(a)) != main_job_folder(str(b))  # same folder name, other data
    assert main_job_folder(str(a)) == main_job_folder(str(a) + "/")
    assert main_job_folder(None) != Path("runs") / "quickstart"  # the quickstart preset's runs/NAME


def test_quickstart_on_other_data_never_resumes_the_builtin_runs(tmp_path, data_cache, other_stories, capsys,
                                                                 monkeypatch):
    """The bug this guards against: --data OTHER found the built-in runs, trained nothing and printed the
    built-in stories' table under OTHER's name. Now the default folders differ, and an explicit shared
    --out is refused."""
    monkeypatch.chdir(tmp_path)
    common = ["--presets", "debug", *TINY, f"data.cache_dir={data_cache}", "train.max_steps=2", "train.eval_every=0"]
    assert main(["quickstart", *common]) == 0
    builtin = tmp_path / "runs" / "main_job" / "builtin" / "debug"
    assert (builtin / "config.yaml").is_file()
    before = tree(builtin)
    capsys.readouterr()
    code = main(["quickstart", "--data", str(other_stories), "--out", "runs/main_job/builtin", *common])
    err = capsys.readouterr().err
    assert code == 2 and "data.train_path" in err and "choose a new --out" in err
    assert tree(builtin) == before


def test_a_step_0_checkpoint_may_be_trained_on_any_data(tmp_path, data_cache, capsys):
    """An imported or upcycled run starts at step 0: it has seen none of this run's data."""
    from somoe.config import load_config
    from somoe.train.checkpoint import save_checkpoint
    from somoe.models import build_model

    run = tmp_path / "imported"
    cfg = load_config(preset="debug", overrides=[*TINY, f"data.cache_dir={data_cache}"])
    save_checkpoint(run, 0, build_model(cfg.model), None, {"step": 0, "tokens_seen": 0, "best_val": float("inf"),
                                                           "best_step": -1, "elapsed": 0.0, "world_size": 1}, cfg)
    assert main(["train", "--preset", "debug", "--out", str(run), "--no-progress", "--resume", "auto", *TINY,
                 f"data.cache_dir={data_cache}", "data.builtin_train_stories=90", "train.max_steps=1",
                 "train.eval_every=0"]) == 0, capsys.readouterr().err
