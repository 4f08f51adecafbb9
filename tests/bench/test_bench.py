"""``somoe bench`` in tiny modes: row schema, ratios and FLOP fractions derived from the rows (never timings)."""

from __future__ import annotations

import json
import math

import pytest

from somoe.bench import flops
from somoe.bench.common import add_mfu, add_ratios, hf_available, table
from somoe.bench.generate import bench_generate
from somoe.bench.layer import bench_layer
from somoe.bench.memory import memory_report
from somoe.bench.train import bench_train
from somoe.cli import main

TINY_MODEL = ("model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.vocab_size=64",
              "model.max_seq_len=16", "data.seq_len=16", "train.batch_size=2", "model.d_ffn=64",
              "model.some.num_experts=8", "model.some.top_k=5", "model.some.d_ffn=8")


def by(rows, **match):
    found = [r for r in rows if all(r.get(k) == v for k, v in match.items())]
    assert len(found) == 1, (match, found)
    return found[0]


def test_flop_counts_by_hand():
    assert flops.linear(2, 3, 4) == 2 * 2 * 3 * 4 * 3  # forward + input and weight gradients
    assert flops.linear(2, 3, 4, trained=False) == 2 * 2 * 3 * 4 * 2  # frozen: input gradient only
    assert flops.linear(2, 3, 4, backward=False) == 48
    # dense of width k*d_ffn vs SoME's frozen experts: 3 units of 2*T*d*(k*F) per matmul pair vs 2
    T, d, E, k, F = 8, 4, 6, 2, 5
    assert flops.dense_ffn(T, d, k * F) == 2 * 6 * T * d * k * F
    assert flops.some_layer(T, d, E, k, F) == 6 * T * d * d + 4 * T * d * E + 2 * 4 * T * k * d * F
    H = 7  # an MLP query net d -> H -> d replaces the d x d one
    assert flops.some_layer(T, d, E, k, F, query_hidden=H) == 2 * 6 * T * d * H + 4 * T * d * E + 2 * 4 * T * k * d * F


def test_ratios_and_mfu_come_from_the_rows():
    rows = [{"impl": "dense", "dtype": "fp32", "n": 1, "ms": 10.0, "flops": 2e9},
            {"impl": "some", "dtype": "fp32", "n": 1, "ms": 12.5, "flops": 1e9},
            {"impl": "some", "dtype": "bf16", "n": 1, "ms": 4.0, "flops": 1e9}]  # no bf16 reference
    add_ratios(rows, "dense", ("dtype", "n"))
    add_mfu(rows, {"fp32": 1e12, "bf16": 4e12})
    assert rows[1]["ratio"] == 1.25 and rows[1]["reference"] == "dense" and rows[0]["ratio"] == 1.0
    assert "ratio" not in rows[2]
    assert math.isclose(rows[1]["mfu"], 1e9 / 0.0125 / 1e12)  # 80 GFLOP/s of a 1 TFLOP/s ceiling
    assert math.isclose(rows[2]["mfu"], 1e9 / 0.004 / 4e12)
    text = table(rows, ["impl", "dtype", "ms", "ratio"]).splitlines()
    assert len(text) == 4 and text[2].split() == ["some", "fp32", "12.5", "1.25"]


def test_layer_bench_rows():
    rows = bench_layer(grid=((4, 2),), dtypes=("fp32", "bf16"), tokens=16, d_model=16, d_ffn=8, reps=1)
    got = {r["impl"] for r in rows}
    hf_impls = {i for i in got if i.startswith("transformers_mixtral_")}
    assert got - hf_impls == {"dense", "some", "moe"} and len(rows) == 2 * len(got)
    assert ("transformers_mixtral_eager" in hf_impls) == hf_available()
    for r in rows:
        dense = by(rows, impl="dense", dtype=r["dtype"])
        assert {"impl", "dtype", "tokens", "d_model", "num_experts", "top_k", "d_ffn", "ms", "cpu_ms"} <= r.keys()
        assert r["reference"] == "dense" and math.isclose(r["ratio"], r["ms"] / dense["ms"])
        assert math.isclose(r["mfu"], r["flops"] / (r["ms"] / 1e3) / r["ceiling_flop_s"])
    some = by(rows, impl="some", dtype="fp32")
    assert some["flops"] == flops.some_layer(16, 16, 4, 2, 8)
    if hf_available():
        fastest = min((r for r in rows if r["impl"] in hf_impls and r["dtype"] == "fp32"), key=lambda r: r["ms"])
        assert math.isclose(some["speedup_vs_transformers"], fastest["ms"] / some["ms"])
        assert some["transformers_reference"] == fastest["impl"]


def test_train_bench_rows_and_bf16_speedup_field():
    rows = bench_train(("cpu_gpt2", "cpu_some"), dtypes=("fp32", "bf16"), reps=1, overrides=TINY_MODEL)
    ours = [r for r in rows if not r["impl"].startswith("transformers")]
    assert {r["impl"] for r in ours} == {"cpu_gpt2", "cpu_some"}
    for r in rows:
        assert math.isclose(r["tokens_per_s"], 2 * 16 / (r["ms"] / 1e3))
        ref = by(rows, impl=r["reference"], dtype=r["dtype"])
        assert math.isclose(r["ratio"], r["tokens_per_s"] / ref["tokens_per_s"])
    some16 = by(rows, impl="cpu_some", dtype="bf16")
    assert math.isclose(some16["vs_fp32"], some16["tokens_per_s"] / by(rows, impl="cpu_some", dtype="fp32")["tokens_per_s"])
    assert some16["params_trainable"] < some16["params_total"]  # frozen experts counted, not trained
    if hf_available():
        hf = by(rows, impl="transformers_gpt2@cpu_gpt2", dtype="fp32")
        assert hf["reference"] == "cpu_gpt2" and hf["batch"] == 2


def test_generate_bench_rows():
    rows = bench_generate("cpu_gpt2", dtypes=("fp32",), batch=2, prompt_len=4, new_tokens=3, reps=1,
                          overrides=TINY_MODEL)
    ours = by(rows, impl="somoe")
    assert math.isclose(ours["tokens_per_s"], 2 * 3 / (ours["ms"] / 1e3))
    if hf_available():
        hf = by(rows, impl="transformers_generate")
        assert math.isclose(ours["ratio"], ours["tokens_per_s"] / hf["tokens_per_s"]) and hf["ratio"] == 1.0


@pytest.mark.parametrize("save", ["seed", "weights"])
def test_memory_report_counts_frozen_experts_once(save):
    over = TINY_MODEL + ("model.ffn=some", "model.some.expert_dtype=bf16", f"model.some.save_experts={save}")
    r = memory_report("cpu_some", batch=2, seq_len=8, overrides=over)
    frozen = 1 * 8 * (2 * 32 * 8 + 8 + 32)  # layers * E * (W1 + W2 + b1 + b2)
    assert r["params_frozen"] == frozen and r["frozen_bytes"] == 2 * frozen  # bf16 storage
    assert r["frozen_in_optimizer"] == 0
    assert r["optimizer_state_bytes"] == 8 * r["params_trainable"] == 2 * r["grad_bytes"]
    assert r["frozen_in_checkpoint_bytes"] == (2 * frozen if save == "weights" else 0)
    assert r["activation_saved_bytes"] > 0 and r["fits_budget"] is True


def test_cli_json_and_bad_grid(capsys):
    assert main(["bench", "layer", "--json", "--grid", "4:2", "--tokens", "8", "--d-model", "8", "--d-ffn", "4",
                 "--reps", "1", "--dtypes", "fp32"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert {"dense", "some", "moe"} <= {r["impl"] for r in rows}
    assert all(r["bench"] == "layer" and r["num_experts"] == 4 and r["top_k"] == 2 for r in rows)
    assert main(["bench", "layer", "--grid", "4:9"]) == 2
    assert "--grid" in capsys.readouterr().err
    assert main(["bench", "layer", "--dtypes", "fp16"]) == 2


def test_train_bench_compiled_rows_and_bf16_some_experts(monkeypatch):
    """--compile runs every model compiled (flagged per row); SoME rows store the experts in the row's dtype."""
    import somoe.models.transformer as transformer

    built = {}
    real_build = transformer.build_model

    def recording_build(cfg, device="cpu"):
        model = real_build(cfg, device)
        built[cfg.ffn] = cfg.some.expert_dtype
        return model

    monkeypatch.setattr(transformer, "build_model", recording_build)
    rows = bench_train(("cpu_some",), dtypes=("bf16",), reps=1, overrides=TINY_MODEL, compile=True)
    assert all(r["compiled"] for r in rows) and {"cpu_gpt2", "cpu_some"} <= {r["impl"] for r in rows}
    assert all(r["tokens_per_s"] > 0 for r in rows)
    assert by(rows, impl="cpu_some")["reference"] == "cpu_gpt2"
    assert built["some"] == "bf16"
    bench_train(("cpu_some",), dtypes=("fp32",), reps=1, overrides=TINY_MODEL)
    assert built["some"] == "fp32"  # though cpu_some's preset stores its experts in bf16


def test_train_bench_reference_preset_replaces_cpu_gpt2():
    """--reference names the preset the others are measured against; cpu_gpt2 is then not built at all."""
    rows = bench_train(("cpu_some",), dtypes=("fp32",), reps=1, overrides=TINY_MODEL, reference="cpu_moe")
    assert {r["impl"] for r in rows if not r["impl"].startswith("transformers")} == {"cpu_moe", "cpu_some"}
    some, ref = by(rows, impl="cpu_some"), by(rows, impl="cpu_moe")
    assert some["reference"] == "cpu_moe" and math.isclose(some["ratio"], some["tokens_per_s"] / ref["tokens_per_s"])


def test_ops_bench_cli_counts_every_impl_and_path(capsys):
    assert main(["bench", "ops", "--json", "--grid", "8:2", "--tokens", "16", "--d-model", "16", "--d-ffn", "8",
                 "--top", "3"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert {(r["impl"], r["path"]) for r in rows} == {(i, p) for i in ("dense", "moe", "some") for p in ("host", "device")}
    for r in rows:
        assert r["ops"] > 0 and sum(r["top_ops"].values()) <= r["ops"] and len(r["top_ops"]) <= 3
    some = {r["path"]: r["ops"] for r in rows if r["impl"] == "some"}
    assert some["device"] <= 70 < some["host"]  # the per-expert loop issues ops per expert
    assert main(["bench", "ops", "--paths", "gpu"]) == 2
    assert "--paths" in capsys.readouterr().err


def test_compile_bench_refuses_one_step(capsys):
    assert main(["bench", "compile", "--steps", "1"]) == 2
    assert "--steps" in capsys.readouterr().err


def test_gpu_bench_dry_run_on_cpu_and_its_mfu_formula():
    from somoe.bench.gpu import bench_gpu

    notes: list[str] = []
    rows = bench_gpu(("seed000_gpt2",), ("eager", "cudagraphs"), steps=2, warmup=1, device="cpu",
                     overrides=TINY_MODEL, with_hf=False, notes=notes)
    assert [r["mode"] for r in rows] == ["eager"] and "cudagraphs mode skipped" in notes[0]
    r = rows[0]
    # tiny seed000_gpt2: d=32, 1 layer, vocab 64 (embedding and untied head), d_ffn 64, biases, RoPE
    d, V, F = 32, 64, 64
    n_active = 2 * V * d + 2 * (2 * d) + (3 * d * d + 3 * d) + (d * d + d) + (d * F + F) + (F * d + d) + 2 * d
    assert r["flops"] == 6 * n_active * 2 * 16 + 12 * 1 * d * 16 * 2 * 16
    assert math.isclose(r["mfu"], r["flops"] / (r["ms"] / 1e3) / r["peak_flop_s"])
    assert math.isclose(r["tokens_per_s"], 2 * 16 / (r["ms"] / 1e3)) and r["ms_p10"] <= r["ms"] <= r["ms_p90"]
