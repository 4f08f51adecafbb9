"""`somoe transition`: phase configs, and a tiny end-to-end run (dense -> verified upcycling -> MoE)."""

from __future__ import annotations

import json

import pytest

from helpers import TINY
from somoe.cli import main
from somoe.config import ConfigError, load_config
from somoe.evaluate.runs import load_run
from somoe.experiments.transition import boundary_summary, phase_configs


def transition_config(cache, *overrides):
    return load_config(preset="debug", overrides=TINY + [
        f"data.cache_dir={cache}", "model.ffn=moe", "model.moe.num_experts=4", "model.moe.top_k=2",
        "train.max_steps=6", "train.eval_every=3", "train.log_every=2",
        "transition.moe_steps=4", "transition.moe_lr=1e-3", "transition.sample_tokens=5", *overrides])


def test_phase_configs_split_the_run_and_silence_the_boundary_noise(data_cache):
    cfg = transition_config(data_cache, "transition.moe_schedule=constant", "transition.moe_warmup_steps=1")
    dense, moe = phase_configs(cfg)
    assert (dense.model.ffn, moe.model.ffn) == ("dense", "moe")
    assert dense.train.max_steps == 6 and dense.train.lr == cfg.train.lr
    assert moe.train.max_steps == 4 and moe.train.lr == 1e-3 and moe.train.schedule == "constant"
    assert moe.train.warmup_steps == 1 and moe.train.seed == dense.train.seed + 1
    assert moe.model.moe.noise_start_step == 1 and cfg.model.moe.noise_start_step == 0
    with pytest.raises(ConfigError, match="transition.moe_step"):
        load_config(preset="debug", overrides=["transition.moe_step=3"])
    with pytest.raises(ConfigError, match="capacity_factor"):
        phase_configs(transition_config(data_cache, "model.moe.capacity_factor=1.0"))


def test_boundary_summary_from_a_hand_made_history():
    history = [
        {"phase": "dense", "kind": "train", "step": 10, "loss": 3.0},
        {"phase": "dense", "kind": "eval", "step": 10, "val_loss": 3.2},
        {"phase": "moe", "kind": "eval", "step": 0, "val_loss": 3.2000001},
        {"phase": "moe", "kind": "train", "step": 1, "loss": 3.04},
        {"phase": "moe", "kind": "train", "step": 5, "loss": 2.5},
        {"phase": "moe", "kind": "eval", "step": 5, "val_loss": 2.9},
    ]
    s = boundary_summary(history, {"max_diff": 3e-7})
    assert s["boundary_jump"] == pytest.approx(0.04) and s["phase2_drop"] == pytest.approx(0.54)
    assert s["val_jump"] == pytest.approx(1e-7, abs=1e-9) and s["phase2_val_drop"] == pytest.approx(0.3000001)
    assert s["verification_max_diff"] == 3e-7


def test_tiny_transition_end_to_end_and_resume(tmp_path, data_cache, capsys):
    out = tmp_path / "tr"
    args = ["transition", "--preset", "debug", "--out", str(out), "--no-progress", *TINY,
            f"data.cache_dir={data_cache}", "model.ffn=moe", "model.moe.num_experts=4", "model.moe.top_k=2",
            "train.max_steps=6", "train.eval_every=3", "train.log_every=2", "transition.moe_steps=4",
            "transition.moe_lr=1e-3", "transition.sample_tokens=5"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "PASSED" in printed and "BOUNDARY SUMMARY" in printed

    for name in ("dense", "moe_init", "moe_final"):
        run = load_run(out / "checkpoints" / name, device="cpu")
        assert run.cfg.model.ffn == ("dense" if name == "dense" else "moe")
    assert json.loads((out / "checkpoints" / "moe_final" / "trainer_state.json").read_text())["step"] == 4

    history = [json.loads(l) for l in (out / "training_history.jsonl").read_text().splitlines()]
    train = [(r["phase"], r["global_step"]) for r in history if r["kind"] == "train"]
    assert train == [("dense", 2), ("dense", 4), ("dense", 6), ("moe", 7), ("moe", 8), ("moe", 10)]
    moe_evals = [r for r in history if r["phase"] == "moe" and r["kind"] == "eval"]
    assert moe_evals[0]["step"] == 0 and "layer0/usage_gini" in moe_evals[0]

    s = json.loads((out / "boundary.json").read_text())
    assert s["verification_max_diff"] < 1e-5
    assert abs(s["val_jump"]) < 1e-4  # same validation data, fp32: the conversion itself is lossless
    assert s["boundary_jump"] == pytest.approx(s["phase2_first_loss"] - s["phase1_final_loss"])
    first = json.loads((out / "moe" / "first_step.json").read_text())
    assert first["step"] == 1 and first["loss"] == s["phase2_first_loss"]
    assert (out / "transition.png").is_file() and (out / "moe" / "summary.txt").is_file()
    samples = (out / "samples.txt").read_text()
    assert "phase 1 (dense)" in samples and "phase 2 (MoE)" in samples and samples.count("->") == 6

    # a rerun resumes: nothing is retrained, the summary is rebuilt from the same records
    assert main(args) == 0
    again = json.loads((out / "boundary.json").read_text())
    assert again == s
    rerun = [json.loads(l) for l in (out / "training_history.jsonl").read_text().splitlines()]
    assert rerun == history  # no duplicate records


def test_main_job_moe_flag_adds_the_moe_row(tmp_path, data_cache, capsys):
    out = tmp_path / "qs"
    code = main(["quickstart", "--presets", "debug", "--moe", "--out", str(out), *TINY,
                 f"data.cache_dir={data_cache}", "train.max_steps=3", "model.d_ffn=64"])
    assert code == 0
    table = capsys.readouterr().out.split("run ")[-1]
    rows = {line.split("|")[0].strip(): line.split("|")[1].strip() for line in table.splitlines()[2:4]}
    assert rows == {"debug": "dense", "cpu_moe": "moe"}
    assert load_run(out / "cpu_moe", device="cpu").cfg.model.moe.num_experts == 8
