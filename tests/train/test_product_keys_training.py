"""Training a product-key SoME model: the loss falls, an interrupted run resumes bit for bit (sub-keys,
selection bias, usage and dormancy included), and two data-parallel ranks end with identical sub-keys."""

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

PK = ("model.ffn=some", "model.some.router=product", "model.some.num_experts=64", "model.some.top_k=4",
      "model.some.pk_heads=2", "model.some.pk_dim=4", "model.some.d_ffn=16", "model.some.expert_storage=procedural",
      "model.some.expert_bias=false", "model.some.sign_bank_rows=64", "model.some.selection_bias_rate=0.01",
      "model.some.decay_target=sample", "model.some.theta_percentile=0.1", "model.some.center_queries=true",
      "model.some.key_ema=0.5", "model.some.gamma=0", "model.some.topk_warmup=0", "model.some.init_method=normal")


def _rows(run_dir, kind):
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def test_product_key_run_learns_and_resumes_exactly(tmp_path, data_cache):
    overrides = PK + ("train.max_steps=8", "train.ckpt_every=4", "train.eval_every=4", "model.dropout=0.1")
    full = tmp_path / "full"
    Trainer(tiny_config(data_cache, *overrides), full, progress=False, log=lambda m: None).fit()
    part = tmp_path / "part"
    first = Trainer(tiny_config(data_cache, *overrides), part, progress=False, log=lambda m: None)
    for _ in range(4):  # as if killed right after the step-4 checkpoint
        metrics = first.train_step()
        for cb in first.callbacks:
            cb.on_step_end(first, metrics)
    resumed = Trainer(tiny_config(data_cache, *overrides), part, resume="auto", progress=False, log=lambda m: None)
    assert resumed.step == 4
    resumed.fit()

    a = {r["step"]: r["loss"] for r in _rows(full, "train")}
    b = {r["step"]: r["loss"] for r in _rows(part, "train")}
    assert sorted(a) == sorted(b) == list(range(1, 9)) and a == b  # bit-identical in fp32 on CPU
    assert a[8] < a[1]
    sa, sb = (load_file(str(list_checkpoints(d)[-1] / "model.safetensors")) for d in (full, part))
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert sa["blocks.0.ffn.key_store"].shape == (4, 8, 4)  # 2 heads x 2 codebooks of 8 sub-keys
    assert not any(k.endswith(("expert_w1", "expert_w2")) for k in sa)  # procedural experts: none stored
    assert sa["blocks.0.ffn.selection_bias"].abs().sum() > 0  # the balancing moved
    evals = _rows(full, "eval")
    assert {"layer0/coverage", "layer0/usage_kl_uniform", "layer0/max_violation", "layer0/codebook_gini_max",
            "layer0/coverage_slots", "layer0/dormant", "layer0/run_coverage", "layer0/train_coverage"} <= set(evals[-1])
    # over the run, training has routed at least what it routed since the last eval, and more than nothing
    assert 0 < evals[-1]["layer0/train_coverage"] <= evals[-1]["layer0/run_coverage"] <= 1


@pytest.mark.slow
def test_two_ranks_keep_identical_sub_keys(tmp_path, data_cache):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "somoe.cli",
           "train", "--preset", "debug", "--out", str(out), "--no-progress",
           *TINY, f"data.cache_dir={data_cache}", "train.max_steps=4", "train.eval_every=2", *PK]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = _rows(out, "final")[-1]
    assert final["som_rank_divergence"] == 0.0
