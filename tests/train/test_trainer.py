"""The trainer: loss falls, accumulation equals one big batch, run folders are complete."""

import json

import torch

from helpers import tiny_config
from somoe.report.summary import summarize_run, write_report
from somoe.train.optim import lr_at
from somoe.train.trainer import Trainer
from somoe.config import TrainConfig


def quiet(cfg, run_dir, **kw):
    return Trainer(cfg, run_dir, progress=False, log=lambda m: None, **kw)


def test_loss_falls_and_run_folder_is_complete(tmp_path, data_cache):
    run = tmp_path / "run"
    cfg = tiny_config(data_cache, "train.max_steps=60", "train.eval_every=30", "train.lr=1e-2")
    quiet(cfg, run).fit()
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r["loss"] for r in rows if r["kind"] == "train"]
    evals = [r for r in rows if r["kind"] == "eval"]
    assert len(train) == 60 and len(evals) == 2
    # at least a nat lower (60 steps: on real stories the tiny model needs ~45 to get there)
    assert sum(train[-5:]) / 5 < sum(train[:5]) / 5 - 1.0
    assert evals[1]["val_loss"] < evals[0]["val_loss"]
    write_report(run)
    for name in ("config.yaml", "params.json", "tokenizer.json", "summary.txt", "metrics.png"):
        assert (run / name).is_file(), name
    summary = summarize_run(run)
    assert summary["best_val_loss"] == min(r["val_loss"] for r in evals)
    assert summary["tokens_seen"] == evals[-1]["tokens"] > 0
    assert "best val loss" in (run / "summary.txt").read_text()


def test_gradient_accumulation_equals_one_big_batch(tmp_path, data_cache):
    a = quiet(tiny_config(data_cache, "train.max_steps=3", "train.grad_accum=1"), tmp_path / "a")
    b = quiet(tiny_config(data_cache, "train.max_steps=3", "train.grad_accum=4"), tmp_path / "b")
    la = [a.train_step()["loss"] for _ in range(3)]
    lb = [b.train_step()["loss"] for _ in range(3)]
    for x, y in zip(la, lb):
        assert abs(x - y) < 1e-5
    for (n, p), (_, q) in zip(a.model.named_parameters(), b.model.named_parameters()):
        assert torch.allclose(p, q, atol=1e-5), n


def test_padded_mode_trains_and_ignores_pad(tmp_path, data_cache):
    cfg = tiny_config(data_cache, "data.mode=padded", "train.max_steps=2", "model.max_seq_len=512", "data.seq_len=512")
    trainer = quiet(cfg, tmp_path / "p")
    metrics = trainer.train_step()
    x, y = trainer.batches.batch(1, cfg.train.batch_size, 0, cfg.train.batch_size)
    counted = int((y != -100).sum())
    assert counted < y.numel()  # short stories leave padding that is not counted
    assert metrics["tokens"] > 0


def test_lr_schedules():
    cfg = TrainConfig(lr=1.0, min_lr_ratio=0.1, warmup_steps=10, schedule="cosine")
    assert lr_at(0, 110, cfg) == 0.1  # linear warmup from lr/warmup
    assert lr_at(9, 110, cfg) == 1.0
    assert abs(lr_at(60, 110, cfg) - 0.55) < 1e-12  # halfway through the cosine: (1 + 0.1) / 2
    assert abs(lr_at(110, 110, cfg) - 0.1) < 1e-12
    one = TrainConfig(lr=1.0, schedule="onecycle")
    assert abs(lr_at(0, 100, one) - 0.04) < 1e-12 and abs(lr_at(30, 100, one) - 1.0) < 1e-12
