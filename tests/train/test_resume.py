"""Checkpoints: a resumed run reproduces the uninterrupted one; broken checkpoints fail clearly."""

import json
import os

import pytest
import torch

from helpers import tiny_config
from somoe.config import ConfigError
from somoe.train.checkpoint import (CheckpointError, check_checkpoint, find_resumable, list_checkpoints,
                                    load_model_state)
from somoe.train.trainer import Trainer


def losses(run_dir):
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}


def test_resume_reproduces_uninterrupted_run_exactly(tmp_path, data_cache):
    overrides = ("train.max_steps=8", "train.ckpt_every=4", "train.eval_every=0", "model.dropout=0.1")
    full = tmp_path / "full"
    Trainer(tiny_config(data_cache, *overrides), full, progress=False, log=lambda m: None).fit()

    part = tmp_path / "part"
    first = Trainer(tiny_config(data_cache, *overrides), part, progress=False, log=lambda m: None)
    for _ in range(4):  # run half, as if killed right after the step-4 checkpoint
        metrics = first.train_step()
        for cb in first.callbacks:
            cb.on_step_end(first, metrics)
    assert [p.name for p in list_checkpoints(part)] == ["step-00000004"]
    resumed = Trainer(tiny_config(data_cache, *overrides), part, resume="auto", progress=False, log=lambda m: None)
    assert resumed.step == 4
    resumed.fit()

    a, b = losses(full), losses(part)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    assert all(a[s] == b[s] for s in a), (a, b)  # bit-identical in fp32 on CPU
    sa, sb = _final_state(full), _final_state(part)
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def _final_state(run_dir):
    from safetensors.torch import load_file

    return load_file(str(list_checkpoints(run_dir)[-1] / "model.safetensors"))


def test_existing_checkpoints_need_resume_flag(tmp_path, data_cache):
    cfg = tiny_config(data_cache, "train.max_steps=2")
    Trainer(cfg, tmp_path / "r", progress=False, log=lambda m: None).fit()
    with pytest.raises(ConfigError, match="--resume auto"):
        Trainer(cfg, tmp_path / "r", progress=False, log=lambda m: None)


def test_truncated_checkpoint_is_a_clear_error_and_resume_falls_back(tmp_path, data_cache):
    cfg = tiny_config(data_cache, "train.max_steps=4", "train.ckpt_every=2", "train.eval_every=0",
                      "train.keep_last=5")
    run = tmp_path / "r"
    Trainer(cfg, run, progress=False, log=lambda m: None).fit()
    newest = list_checkpoints(run)[-1]
    weights = newest / "model.safetensors"
    with open(weights, "r+b") as fh:
        fh.truncate(os.path.getsize(weights) // 2)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        check_checkpoint(newest)
    messages = []
    assert find_resumable(run, log=messages.append).name == "step-00000002"
    assert "skipping step-00000004" in messages[0]


def test_interrupted_write_leaves_previous_checkpoint_loadable(tmp_path, data_cache):
    cfg = tiny_config(data_cache, "train.max_steps=2", "train.ckpt_every=2", "train.eval_every=0")
    run = tmp_path / "r"
    trainer = Trainer(cfg, run, progress=False, log=lambda m: None)
    trainer.fit()
    # a kill mid-write leaves only a .tmp folder behind: it is never taken for a checkpoint
    (run / "checkpoints" / "step-00000003.tmp").mkdir()
    (run / "checkpoints" / "step-00000003.tmp" / "model.safetensors").write_bytes(b"\x00" * 10)
    found = find_resumable(run)
    assert found.name == "step-00000002"
    load_model_state(found, trainer.model)


def test_sigterm_saves_a_checkpoint_and_stops(tmp_path, data_cache):
    import signal

    cfg = tiny_config(data_cache, "train.max_steps=50", "train.eval_every=0")
    trainer = Trainer(cfg, tmp_path / "r", progress=False, log=lambda m: None)

    class Killer:
        def on_train_start(self, t): ...
        def pre_optim_step(self, t): ...
        def on_eval(self, t, m): ...
        def on_train_end(self, t, interrupted): ...
        def on_step_end(self, t, m):
            if t.step == 3:
                os.kill(os.getpid(), signal.SIGTERM)

    trainer.callbacks.append(Killer())
    trainer.fit()
    assert trainer.step == 3
    assert [p.name for p in list_checkpoints(tmp_path / "r")] == ["step-00000003"]
