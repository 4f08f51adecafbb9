"""SoME inside the trainer: readouts logged, resume exact with keys, accumulation and DDP keep keys right."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from helpers import TINY, tiny_config
from somoe.train.checkpoint import list_checkpoints
from somoe.train.trainer import Trainer

SOME = ["model.ffn=some", "model.some.num_experts=8", "model.some.top_k=2", "model.some.d_ffn=64",
        "model.some.alpha=0.05", "model.some.beta=0.01", "model.some.delta=0.01", "model.some.som_warmup_steps=0"]


def quiet(cfg, run_dir, **kw):
    return Trainer(cfg, run_dir, progress=False, log=lambda m: None, **kw)


def keys_of(model):
    return torch.stack([layer.key_store.clone() for layer in model.self_organizing_layers()])


def test_keys_move_and_readouts_reach_metrics(tmp_path, data_cache):
    trainer = quiet(tiny_config(data_cache, *SOME, "train.max_steps=4", "train.eval_every=2"), tmp_path)
    before = keys_of(trainer.model)
    trainer.fit()
    assert (keys_of(trainer.model) - before).abs().max() > 1e-4
    evals = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()
             if json.loads(l)["kind"] == "eval"]
    assert len(evals) == 2
    for layer in range(2):
        gini = evals[-1][f"layer{layer}/usage_gini"]
        entropy = evals[-1][f"layer{layer}/usage_entropy_bits"]
        assert 0.0 <= gini < 1.0 and 0.0 < entropy <= 3.0 + 1e-9  # log2(8) = 3 bits


def test_grad_accumulation_moves_keys_as_one_big_batch(tmp_path, data_cache):
    a = quiet(tiny_config(data_cache, *SOME, "train.max_steps=3"), tmp_path / "a")
    b = quiet(tiny_config(data_cache, *SOME, "train.max_steps=3", "train.grad_accum=4"), tmp_path / "b")
    for _ in range(3):
        a.train_step()
        b.train_step()
    assert torch.allclose(keys_of(a.model), keys_of(b.model), atol=1e-5)


# the cpu_some additions: LayerScale, centred queries, dormant keys re-seeded at sampled queries
CPU_SOME_EXTRAS = ("model.some.layer_scale=0.01", "model.some.center_queries=true", "model.some.center_decay=0.5",
                   "model.some.decay_target=sample", "model.some.theta=64", "model.some.delta=0.05")


@pytest.mark.parametrize("extras", [(), CPU_SOME_EXTRAS], ids=["seed-rules", "cpu-some-extras"])
def test_resume_reproduces_keys_and_losses(tmp_path, data_cache, extras):
    overrides = (*SOME, *extras, "train.max_steps=6", "train.ckpt_every=3", "train.eval_every=0")
    quiet(tiny_config(data_cache, *overrides), tmp_path / "full").fit()
    part = quiet(tiny_config(data_cache, *overrides), tmp_path / "part")
    for _ in range(3):
        metrics = part.train_step()
        for cb in part.callbacks:
            cb.on_step_end(part, metrics)
    quiet(tiny_config(data_cache, *overrides), tmp_path / "part", resume="auto").fit()
    full = load_file(str(list_checkpoints(tmp_path / "full")[-1] / "model.safetensors"))
    resumed = load_file(str(list_checkpoints(tmp_path / "part")[-1] / "model.safetensors"))
    assert full.keys() == resumed.keys()
    assert any("key_store" in k for k in full)
    for k in full:
        assert torch.equal(full[k], resumed[k]), k


@pytest.mark.slow
def test_ddp_keys_identical_across_ranks_and_equal_to_one_process(tmp_path, data_cache):
    def run(out, nproc):
        args = ["train", "--preset", "debug", "--out", str(out), "--no-progress", *TINY, *SOME,
                f"data.cache_dir={data_cache}", "train.max_steps=4", "train.eval_every=0"]
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        cmd = (launcher if nproc > 1 else [sys.executable]) + ["-m", "somoe.cli", *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr[-3000:]
        return load_file(str(list_checkpoints(out)[-1] / "model.safetensors"))

    one, two = run(tmp_path / "one", 1), run(tmp_path / "two", 2)
    final = [json.loads(l) for l in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
             if json.loads(l)["kind"] == "final"]
    assert final and final[0]["som_rank_divergence"] == 0.0  # ranks hold bit-identical keys
    for k in one:
        if "key_store" in k or "usage_ema" in k:
            assert torch.allclose(one[k], two[k], atol=1e-4), k
