"""The product-key SoME model compiles as one graph, and so does its whole training step (key rules on
sub-keys, selection bias, tallies, AdamW): no graph break, no recompile across steps, an eval and a state
reload. ``backend="eager"``: dynamo's tracing is what is tested, not inductor's kernels."""

from __future__ import annotations

import pytest

from somoe.bench.compile import compile_report

TINY_PK = ("model.vocab_size=64", "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.max_seq_len=16",
           "data.seq_len=16", "train.batch_size=2", "model.some.num_experts=64", "model.some.top_k=4",
           "model.some.pk_heads=2", "model.some.pk_dim=8", "model.some.d_ffn=16", "model.some.entropy_band=[1.0,1.3]",
           "model.some.sign_bank_rows=64")
CASES = {"procedural-bias": (), "stored-batchnorm": ("model.some.expert_storage=stored", "model.some.query_batchnorm=true",
                                                     "model.some.decay_target=mean")}


@pytest.mark.parametrize("scope,dtype", [("model", "bf16"), ("step", "fp32")])
@pytest.mark.parametrize("case", list(CASES))
def test_product_key_model_and_step_compile_once_without_graph_breaks(case, scope, dtype):
    row = compile_report("cpu_some_pk", steps=5, overrides=TINY_PK + CASES[case], backend="eager", dtype=dtype,
                         scope=scope)
    assert row["graph_breaks"] == 0, row["break_reasons"]
    assert row["train_compiles"] == 1 and row["recompiles"] == 0, row
