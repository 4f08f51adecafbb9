"""Validation bpb against training FLOPs, and the equal-compute line, by hand."""

import json
import math

from somoe.analysis.compute import bpb_against_flops, bpb_at_flops, equal_compute_line, train_flops_per_token
from somoe.bench import flops
from somoe.config import load_config, save_config


def _run(root, name, preset, evals):
    run = root / name
    run.mkdir()
    cfg = load_config(preset=preset)
    save_config(cfg, run / "config.yaml")
    (run / "metrics.jsonl").write_text("".join(
        json.dumps({"kind": "eval", "step": s, "tokens": t, "val_loss": b, "val_ppl": 1.0, "val_bpb": b}) + "\n"
        for s, t, b in evals))
    return run


def test_flops_per_token_are_the_hand_formula_of_the_config(tmp_path):
    run = _run(tmp_path, "gpt2", "cpu_gpt2", [(1, 1024, 2.0)])
    T, d, L, V = 64, 128, 4, 2048  # cpu_gpt2: 4x128, d_ffn 512, vocab 2048, 64-token windows
    ffn = 2 * 2 * T * d * 512 * 3
    per_layer = 2 * T * d * 4 * d * 3 + 2 * T * T * d * 3 + ffn
    expected = (L * per_layer + 2 * T * d * V * 3) / T
    assert math.isclose(train_flops_per_token(run), expected)
    assert bpb_against_flops(run) == ([1024 * expected], [2.0])


def test_bpb_at_flops_interpolates_in_log_flops():
    assert bpb_at_flops([1e9, 1e11], [2.0, 1.0], 1e10) == 1.5  # halfway in log space
    assert bpb_at_flops([1e9, 1e11], [2.0, 1.0], 1e11) == 1.0
    assert bpb_at_flops([1e9, 1e11], [2.0, 1.0], 1e12) is None


def test_equal_compute_line_reads_every_run_at_the_smallest_total(tmp_path):
    cheap = _run(tmp_path, "gpt2", "cpu_gpt2", [(1, 1000, 2.0), (2, 4000, 1.5)])
    dear = _run(tmp_path, "some", "cpu_some", [(1, 1000, 1.9), (2, 4000, 1.4)])
    f_cheap, f_dear = train_flops_per_token(cheap), train_flops_per_token(dear)
    assert f_dear > f_cheap
    budget = 4000 * f_cheap  # the cheaper run's total: the dearer one reached it between its two evals
    t = (math.log(budget) - math.log(1000 * f_dear)) / (math.log(4000 * f_dear) - math.log(1000 * f_dear))
    line = equal_compute_line([cheap, dear], ["gpt2", "some"])
    assert line == (f"at equal training compute ({budget:.3g} FLOPs, the smallest run's total): "
                    f"validation bpb gpt2 1.5000, some {1.9 + t * (1.4 - 1.9):.4f}")
    assert flops.linear(1, 1, 1) == 6  # the convention the counts rest on: 2 forward + 4 backward per weight
