"""Dense -> MoE upcycling: exact equivalence on both backbones, a broken transfer fails the
verification, and `somoe upcycle` writes a run that eval and train accept."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import TINY
from somoe.cli import main
from somoe.config import ConfigError, load_config
from somoe.evaluate.scoring import evaluate_run
from somoe.models import build_model
from somoe.evaluate.runs import load_run
from somoe.train.trainer import Trainer
from somoe.experiments.upcycle import expert_groups, moe_config, random_probe, upcycle_model, verify

BACKBONES = {
    "gpt2": [],
    "smollm": ["model.backbone=smollm", "model.positions=rope", "model.activation=swiglu", "model.bias=false"],
}


def dense_lm(backbone: str):
    """A tiny dense LM with large random weights, so its logits are far from zero."""
    cfg = load_config(preset="debug", overrides=TINY + BACKBONES[backbone] + ["model.init_std=0.2"])
    torch.manual_seed(0)
    return cfg, build_model(cfg.model)


@pytest.mark.parametrize("backbone", ["gpt2", "smollm"])
def test_upcycled_logits_match_the_dense_model_in_fp32(backbone):
    cfg, dense = dense_lm(backbone)
    moe = upcycle_model(dense, moe_config(cfg, num_experts=4, top_k=2))
    assert moe.blocks[0].ffn.cfg.num_experts == 4 and moe.param_counts()["total"] > dense.param_counts()["total"]
    probe = random_probe(cfg.model.vocab_size, 32, 6)
    result = verify(dense, moe, probe)
    assert len(result.per_sequence) == 6
    assert result.passed and result.max_diff < 1e-5
    with torch.no_grad():
        assert dense(probe).logits.std() > 0.5  # a real comparison, not between near-zero logits


@pytest.mark.parametrize("backbone", ["gpt2", "smollm"])
def test_one_perturbed_expert_fails_the_verification(backbone):
    cfg, dense = dense_lm(backbone)
    moe = upcycle_model(dense, moe_config(cfg, num_experts=5, top_k=2))
    with torch.no_grad():  # the last expert of the last layer: the zero router's tie-break never picks it
        w = moe.blocks[-1].ffn.expert_w1
        w[4] += 0.05 * torch.randn_like(w[4])
    result = verify(dense, moe, random_probe(cfg.model.vocab_size, 32, 4))
    assert not result.passed and result.max_diff > 1e-3
    assert "FAILED" in result.lines()[-1] and "FAIL" in result.lines()[1]


def test_expert_groups_cover_every_expert_with_k_distinct_ones():
    for E, K in [(8, 2), (5, 2), (3, 3), (7, 1), (6, 4)]:
        groups = expert_groups(E, K)
        assert all(len(set(g)) == K for g in groups)
        assert set().union(*map(set, groups)) == set(range(E))


def test_moe_config_rejects_what_would_break_equivalence():
    cfg, _ = dense_lm("gpt2")
    with pytest.raises(ConfigError, match="capacity_factor"):
        moe_config(cfg, overrides=["model.moe.capacity_factor=1.25"])
    with pytest.raises(ConfigError, match="d_ffn"):
        moe_config(cfg, overrides=["model.moe.d_ffn=7"])
    with pytest.raises(ConfigError, match="backbone"):
        moe_config(cfg, overrides=["model.n_layers=3"])
    with pytest.raises(ConfigError, match="dense run"):
        moe_config(moe_config(cfg))


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory, data_cache):
    out = tmp_path_factory.mktemp("upcycle") / "dense"
    cfg = load_config(preset="debug", overrides=TINY + [f"data.cache_dir={data_cache}", "train.max_steps=4"])
    Trainer(cfg, out, progress=False, log=lambda m: None).fit()
    return out


def test_upcycle_command_writes_a_run_that_evaluates_like_the_dense_one(dense_run, tmp_path, capsys):
    out = tmp_path / "moe"
    code = main(["upcycle", str(dense_run), "--out", str(out), "--experts", "4", "--top-k", "2", "--device", "cpu",
                 "--set", "model.moe.aux_loss_coef=0.02"])
    printed = capsys.readouterr().out
    assert code == 0
    assert printed.count("OK") == 8 and "PASSED" in printed  # 8 probe sequences, one line each
    report = json.loads((out / "upcycle.json").read_text())
    assert report["passed"] and report["max_diff"] < 1e-4 and report["probe"] == "validation windows"
    run = load_run(out, device="cpu")
    assert run.cfg.model.ffn == "moe" and run.cfg.model.moe.num_experts == 4
    assert run.cfg.model.moe.aux_loss_coef == 0.02
    moe_eval = evaluate_run(out, device="cpu", max_batches=2)
    dense_eval = evaluate_run(dense_run, device="cpu", max_batches=2)
    assert moe_eval["tokens"] == dense_eval["tokens"]
    assert moe_eval["loss"] == pytest.approx(dense_eval["loss"], abs=1e-5)
    assert "layer0/usage_gini" in moe_eval and "layer0/dropped_pct" in moe_eval
    # the folder is an ordinary run: training resumes from the upcycled step 0
    cfg = load_config(config_file=str(out / "config.yaml"), overrides=["train.max_steps=2", "train.eval_every=0"])
    trainer = Trainer(cfg, out, resume="auto", progress=False, log=lambda m: None)
    assert trainer.step == 0
    trainer.fit()
    assert trainer.step == 2 and (out / "checkpoints" / "step-00000002").is_dir()


def test_upcycle_command_refuses_an_existing_run_and_a_moe_run(dense_run, tmp_path, capsys):
    out = tmp_path / "moe"
    assert main(["upcycle", str(dense_run), "--out", str(out), "--device", "cpu"]) == 0
    assert main(["upcycle", str(dense_run), "--out", str(out), "--device", "cpu"]) == 2
    assert "already has checkpoints" in capsys.readouterr().err
    assert main(["upcycle", str(out), "--out", str(tmp_path / "again"), "--device", "cpu"]) == 2
    assert "needs a dense run" in capsys.readouterr().err
