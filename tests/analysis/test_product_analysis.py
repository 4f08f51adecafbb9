"""``somoe analyze`` of a product-key run: n x n usage maps whose slots add up, and the codebook figures."""

import json

from helpers import tiny_config
from somoe.analysis.run_analysis import analyze_run
from somoe.train.trainer import Trainer

PK = ("model.ffn=some", "model.some.router=product", "model.some.num_experts=64", "model.some.top_k=3",
      "model.some.pk_heads=2", "model.some.pk_dim=4", "model.some.d_ffn=16", "model.some.expert_storage=procedural",
      "model.some.expert_bias=false", "model.some.sign_bank_rows=64", "model.some.topk_warmup=0",
      "model.some.gamma=0", "model.some.init_method=normal")


def test_analyze_draws_each_layers_usage_map(tmp_path, data_cache):
    run = tmp_path / "pk"
    Trainer(tiny_config(data_cache, *PK, "train.max_steps=2"), run, progress=False, log=lambda m: None).fit()
    report = analyze_run(run, sample_batches=2, log=lambda m: None)
    raw = json.loads((run / "analysis" / "analysis.json").read_text())
    assert set(raw["layers"]) == {"0", "1"}
    for layer in raw["layers"].values():
        counts = layer["counts_nn"]
        assert len(counts) == len(counts[0]) == 8  # n x n for N = 64
        slots = sum(map(sum, counts))
        assert slots == layer["readouts"]["coverage_slots"]
        assert slots % (2 * 3) == 0 and slots > 0  # every counted token: 2 heads x top-3
        used = sum(c > 0 for row in counts for c in row)
        assert abs(layer["readouts"]["coverage"] - used / 64) < 1e-12
    for png in ("usage_maps.png", "codebooks.png"):
        assert (run / "analysis" / png).stat().st_size > 10_000
    assert "| 0 | 8 x 8 |" in report.read_text()
