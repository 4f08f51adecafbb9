"""A sweep's figures against a config value, from hand-written run files."""

import json

import yaml

from somoe.analysis.scaling import scaling_report, scaling_rows


def _run(root, name, experts, router, bpbs, coverage, run_coverage, kl, wall):
    run = root / name
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"name": name, "model": {"n_layers": 2, "some": {
        "num_experts": experts, "router": router}}, "data": {"seq_len": 4}, "train": {"batch_size": 2}}))
    rows = [{"kind": "train", "step": 10, "loss": 3.0, "tokens": 80, "elapsed": wall}]
    for step, bpb in zip((5, 10), bpbs):
        rows.append({"kind": "eval", "step": step, "val_loss": bpb, "val_ppl": 1.0, "val_bpb": bpb, "tokens": 8 * step,
                     "elapsed": wall, "layer0/coverage": coverage[0], "layer1/coverage": coverage[1],
                     "layer0/run_coverage": run_coverage, "layer1/run_coverage": run_coverage,
                     "layer0/usage_kl_uniform": kl, "layer1/usage_kl_uniform": kl + 1.0,
                     "layer0/codebook_gini_max": 0.2, "layer1/codebook_gini_max": 0.4})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def test_scaling_rows_and_report(tmp_path):
    a = _run(tmp_path, "pk_1k", 1024, "product", (1.5, 1.3), (0.5, 0.7), 0.9, 1.0, 20.0)
    b = _run(tmp_path, "ex_128", 128, "exhaustive", (1.4, 1.45), (1.0, 1.0), 1.0, 1.0, 10.0)
    rows = scaling_rows([a, b], "model.some.num_experts")
    assert rows[0]["model.some.num_experts"] == 1024 and rows[0]["router"] == "product"
    assert rows[0]["best_val_bpb"] == 1.3 and rows[1]["best_val_bpb"] == 1.4  # the best eval, not the last
    assert abs(rows[0]["coverage_eval"] - 0.6) < 1e-12  # mean over layers
    assert rows[0]["kl_uniform"] == 2.0 / 2 + 0.5 and rows[0]["codebook_gini_max"] == 0.4
    assert rows[0]["step_ms"] == 1e3 * 20.0 / 10 and rows[1]["step_ms"] == 1e3
    table = scaling_report([a, b], "model.some.num_experts", tmp_path / "out")
    assert "| pk_1k | 1,024 | product | 1.3000 | 0.600 | 0.900 | 1.500 | 0.400 | 2000 |" in table
    assert (tmp_path / "out" / "scaling.png").stat().st_size > 10_000
