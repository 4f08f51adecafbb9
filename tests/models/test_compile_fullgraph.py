"""A graph-break-free model and training step: the training forward+backward of tiny dense, MoE and SoME
models (with and without LoRA, both backbones) compiles as one graph in bf16, the whole step in fp32, and nothing recompiles across the
top-k warm-up (k changes), the noise start, the train/eval switch, key updates and a reload of the
model's state. ``backend="eager"``: dynamo's tracing is what is tested, not inductor's kernels."""

from __future__ import annotations

import pytest
import torch

from somoe.bench.compile import compile_report
from somoe.bench.ops import count_step_ops
from somoe.bench.layer import LayerShape, build_layers
from somoe.models.dispatch import static_dispatch

TINY = ("model.vocab_size=64", "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.max_seq_len=16",
        "data.seq_len=16", "train.batch_size=2", "model.d_ffn=64", "model.some.num_experts=8", "model.some.top_k=5",
        "model.some.d_ffn=16", "model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.d_ffn=16",
        "model.some.entropy_band=[1.0,1.5]",
        # cpu_some itself starts at its final k: the ramp is switched on to test it
        "model.some.topk_warmup=0.1", "model.some.topk_ramp=0.1")
SMOLLM = ("model.backbone=smollm", "model.positions=rope", "model.activation=swiglu")
CASES = [("cpu_gpt2", ()), ("cpu_moe", ("model.moe.noise_start_step=2",)), ("cpu_some", ()),
         ("seed000_some", ("model.some.lora_rank=2",)), ("cpu_some", SMOLLM), ("cpu_moe", SMOLLM)]


@pytest.mark.parametrize("preset,extra", CASES, ids=[f"{p}{'-smollm' if e == SMOLLM else ''}{'-lora' if 'model.some.lora_rank=2' in e else ''}"
                                                     for p, e in CASES])
def test_model_compiles_once_without_graph_breaks(preset, extra):
    row = compile_report(preset, steps=5, overrides=TINY + extra, backend="eager", dtype="bf16", scope="model")
    assert row["graph_breaks"] == 0, row["break_reasons"]
    assert row["train_compiles"] == 1 and row["eval_compiles"] == 1 and row["recompiles"] == 0, row


@pytest.mark.parametrize("preset,extra", CASES, ids=[f"{p}{'-smollm' if e == SMOLLM else ''}{'-lora' if 'model.some.lora_rank=2' in e else ''}"
                                                     for p, e in CASES])
def test_whole_training_step_compiles_once_without_graph_breaks(preset, extra):
    """``somoe bench compile``'s whole step (forward, backward, clipping, key rules, tallies, AdamW) in
    fp32, through the top-k ramp, the noise start, an eval and a state reload: one frame, no break."""
    row = compile_report(preset, steps=5, overrides=TINY + extra, backend="eager", dtype="fp32", scope="step")
    assert row["graph_breaks"] == 0, row["break_reasons"]
    assert row["train_compiles"] == 1 and row["recompiles"] == 0, row


def test_masked_top_k_of_a_compiled_forward_equals_the_eager_k():
    """During the top-k warm-up a compiled SoME forward routes over the final k slots with the dead
    ones' gates exactly 0: its output, the query's gradient and every statistic equal eager's at k."""
    from somoe.config import load_config
    from somoe.models.ffn import build_ffn

    cfg = load_config(preset="cpu_some", overrides=list(TINY) + ["model.some.expert_dtype=fp32", "model.some.gamma=0.1"]).model
    torch.manual_seed(0)
    eager, traced = build_ffn(cfg, 0).train(), build_ffn(cfg, 0).train()
    traced.load_state_dict(eager.state_dict())
    torch._dynamo.reset()
    compiled = torch.compile(traced, backend="eager", fullgraph=True)
    for step in (0, 6):  # k = 1, then k = 3 of 5 on the ramp (total 40)
        eager.set_progress(step, 40), traced.set_progress(step, 40)
        assert 1 <= eager.top_k_now < cfg.some.top_k
        x = torch.randn(2, 8, cfg.d_model, generator=torch.Generator().manual_seed(step))
        outs = []
        for layer in (eager, compiled):
            xi = x.clone().requires_grad_(True)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y, _ = layer(xi)
            y.float().square().sum().backward()
            outs.append((y.float(), xi.grad))
        assert torch.allclose(outs[0][0], outs[1][0], atol=2e-2, rtol=2e-2)  # bf16 experts, two dispatch paths
        assert torch.allclose(outs[0][1], outs[1][1], atol=2e-2, rtol=5e-2)
        for name in ("stat_count", "stat_tokens", "stat_peer_mass", "stat_sample_draws"):
            assert torch.equal(eager.get_buffer(name), traced.get_buffer(name)), name
        for name in ("stat_gate", "stat_gate_entropy", "stat_q_sum", "stat_peer_sum"):
            assert torch.allclose(eager.get_buffer(name), traced.get_buffer(name), atol=1e-4, rtol=1e-3), name
        assert torch.equal(eager._tally.counts, traced._tally.counts)


def test_device_path_issues_at_most_70_ops_per_some_step():
    """The GPU path's op budget (``somoe bench ops``): SoME's forward+backward+statistics <= 70 non-view
    ATen ops, independent of the number of experts."""
    shape = LayerShape(tokens=64, d_model=32, d_ffn=32, num_experts=16, top_k=4)
    totals = {}
    for E in (16, 64):
        shape.num_experts = E
        with static_dispatch():
            layers = build_layers(shape, "fp32", torch.device("cpu"), with_hf=False)
            x = torch.randn(1, shape.tokens, shape.d_model, requires_grad=True)
            totals[E] = {impl: count_step_ops(layers[impl], x).total for impl in ("dense", "some")}
    assert totals[16] == totals[64]
    assert totals[16]["some"] <= 70 and totals[16]["dense"] <= 16, totals
