"""analyze / compare / report on tiny trained runs; specialisation counts by hand."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from somoe.analysis.compare import compare_runs
from somoe.analysis.keys import load_run_keys, select_checkpoints
from somoe.analysis.specialization import LayerRouting, expert_tokens, route_counts
from somoe.evaluate.runs import run_val_stream
from somoe.models.ffn.usage import gini
from somoe.cli import main
from somoe.report.summary import read_metrics
from somoe.evaluate.runs import load_run


def test_analyze_writes_report_figures_and_raw_numbers(some_run, tmp_path):
    out = tmp_path / "analysis"
    assert main(["analyze", str(some_run), "--checkpoints", "3,6", "--out", str(out), "--sample-batches", "2"]) == 0
    for name in ("keys_pca", "keys_tsne", "trajectories", "usage_hist", "readouts"):
        assert (out / f"{name}.png").stat().st_size > 10_000, name
    raw = json.loads((out / "analysis.json").read_text())
    assert raw["steps"] == [3, 6] and set(raw["layers"]) == {"0", "1"}
    states = load_run_keys(some_run, "last")
    for i, layer in raw["layers"].items():
        assert sum(layer["cluster_sizes"]) == 16 and len(layer["cluster_labels"]) == 16
        assert sum(layer["cluster_usage"]) == pytest.approx(1.0)
        usage = states[-1].layers[int(i)].usage
        assert layer["usage_max_x_E"] == pytest.approx(float(usage.max() * 16))
        assert len(layer["drift_between_checkpoints"]) == 1 and layer["drift_between_checkpoints"][0] > 0
        assert sum(e["share"] for e in raw["specialization"][i]) <= 1.0 + 1e-9
    text = (out / "analysis.md").read_text()
    assert "## Knowledge galaxies" in text and "![t-SNE](keys_tsne.png)" in text and "### layer 1" in text


def test_analyze_rejects_bad_checkpoints_and_dense_runs(some_run, dense_run, tmp_path):
    assert [p.name for p in select_checkpoints(some_run, "last")] == ["step-00000006"]
    assert main(["analyze", str(some_run), "--checkpoints", "7", "--out", str(tmp_path)]) == 2
    assert main(["analyze", str(some_run), "--checkpoints", "x", "--out", str(tmp_path)]) == 2
    assert main(["analyze", str(dense_run), "--out", str(tmp_path)]) == 2


def test_route_counts_match_the_forward_routing(some_run):
    loaded = load_run(some_run, device="cpu")
    stream = run_val_stream(loaded)
    routing = route_counts(loaded.model, stream, 32, batch_size=8, max_batches=3)  # 3 full batches, no padding
    readouts = loaded.model.readouts()  # the forward's own usage counts since the last reset
    for i, r in routing.items():
        assert r.counts_ET.sum() == 3 * 8 * 32 * 2  # every token routed to top-2
        assert gini(r.expert_slots) == pytest.approx(readouts[f"layer{i}/usage_gini"], abs=1e-12)
        tokens = np.asarray(stream.tokens[: 3 * 8 * 32])
        assert np.array_equal(r.counts_ET.sum(axis=0), 2 * np.bincount(tokens, minlength=r.counts_ET.shape[1]))


def test_loading_a_run_applies_trainings_backend_settings(some_run, monkeypatch):
    """eval, generate and the analyses go through load_run: they get the allocator setting that
    training and the benchmarks run with (keep_freed_cpu_memory on the CPU)."""
    import somoe.evaluate.runs as runs_module

    seen = []
    monkeypatch.setattr(runs_module, "setup_backends", lambda device, *a: seen.append(device))
    load_run(some_run, device="cpu")
    assert seen == [torch.device("cpu")]


def test_expert_tokens_rank_by_count_and_lift(some_run):
    tok = load_run(some_run, device="cpu").tokenizer
    counts = np.zeros((2, 10), dtype=np.int64)
    counts[0, [5, 7]] = [10, 5]
    counts[1, [6, 7]] = [12, 5]
    top = expert_tokens(LayerRouting(0, counts), tok, top_tokens=3)
    assert [t.expert for t in top] == [1, 0]  # busiest first (17 slots vs 15)
    assert top[1].share == pytest.approx(15 / 32)
    assert top[1].top_by_count[0][1] == 10
    (_, lift5, n5), (_, lift7, _) = top[1].top_by_lift[:2]
    assert (n5, lift5) == (10, pytest.approx((10 / 15) / (10 / 32)))  # share in expert / share overall
    assert lift7 == pytest.approx((5 / 15) / (10 / 32))


def test_compare_two_runs_table_and_curves(some_run, dense_run, tmp_path):
    out = tmp_path / "cmp"
    table = compare_runs([dense_run, some_run], out)
    rows = json.loads((out / "compare.json").read_text())
    for row, run in zip(rows, (dense_run, some_run)):
        _, evals = read_metrics(run)
        assert row["best_val_loss"] == min(r["val_loss"] for r in evals)
        assert row["tokens_seen"] == evals[-1]["tokens"] > 0
        assert f"{row['best_val_loss']:.4f}" in table
    assert rows[1]["middle_gini"] and not rows[0]["middle_gini"]  # routing readouts only where present
    assert table.splitlines()[2].startswith("dense_run ") and table.splitlines()[3].startswith("some_run ")
    assert (out / "compare.png").stat().st_size > 10_000 and "compare.png" in (out / "compare.md").read_text()
    assert main(["compare", str(some_run), str(tmp_path / "missing")]) == 2


def test_report_rebuilds_from_metrics_alone(some_run, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("metrics.jsonl", "config.yaml", "params.json"):  # no checkpoints, no tokenizer
        shutil.copy(some_run / name, bare / name)
    assert main(["report", str(bare)]) == 0
    _, evals = read_metrics(bare)
    summary = (bare / "summary.txt").read_text()
    assert f"best val loss: {min(r['val_loss'] for r in evals):.4f}" in summary
    assert summary.count("  eval ") == len(evals) == 2  # middle-layer gini/entropy per eval
    assert (bare / "metrics.png").stat().st_size > 10_000
