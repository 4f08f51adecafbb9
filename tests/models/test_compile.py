"""torch.compile of a SoME model in fp32: the same losses and gradients as eager over several steps
whose routing differs, and no frame compiled after the first step (the fp32 expert dispatch traces
as the opaque op ``somoe::grouped_mm``, models/dispatch/plan.py; whole-graph checks are in
test_compile_fullgraph.py)."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from somoe.config import load_config
from somoe.models.dispatch import expert_counts
from somoe.models.ffn import build_ffn
from somoe.models.transformer import build_model
from somoe.train.runtime import compile_model

SMALL = ["model.vocab_size=128", "model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.max_seq_len=32",
         "data.seq_len=32", "model.some.num_experts=16", "model.some.top_k=8", "model.some.d_ffn=16"]


def test_expert_counts_equal_bincount():
    idx = torch.randint(0, 7, (50, 3), generator=torch.Generator().manual_seed(0))
    counts = expert_counts(idx, 9)
    assert counts.dtype == torch.int64 and counts.tolist() == torch.bincount(idx.flatten(), minlength=9).tolist()


def test_compiled_some_steps_match_eager_without_recompiling():
    cfg = load_config(preset="seed000_some", overrides=SMALL)
    torch.manual_seed(0)
    eager = build_model(cfg.model, "cpu").train()
    twin = build_model(cfg.model, "cpu").train()
    twin.load_state_dict(eager.state_dict())
    torch._dynamo.reset()
    frames = CompileCounterWithBackend("inductor")
    compiled = torch.compile(twin, backend=frames)
    compiled_frames = []
    for step in range(4):
        x = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(step))
        losses, grads = [], []
        for model, params in ((eager, eager), (compiled, twin)):
            model.zero_grad(set_to_none=True)
            loss = model(x, x).loss
            loss.backward()
            losses.append(loss.item())
            grads.append(torch.cat([p.grad.flatten() for p in params.parameters() if p.grad is not None]))
        assert abs(losses[0] - losses[1]) < 1e-5 * losses[0]
        assert torch.allclose(grads[0], grads[1], rtol=1e-3, atol=1e-6)
        compiled_frames.append(frames.frame_count)
    # step 0 compiles (the tallies are buffers allocated at construction); steps 1-3 route
    # differently and must reuse those graphs
    assert compiled_frames[0] > 0 and compiled_frames[3] == compiled_frames[0]



def _compiled_steps(preset: str, extra: list[str], total: int, steps: range) -> list[int]:
    """Frames compiled after each training step of a model compiled as the trainer compiles it
    and told its progress as the trainer tells it (``set_progress`` before every step)."""
    cfg = load_config(preset=preset, overrides=SMALL + extra)
    torch.manual_seed(0)
    model = build_model(cfg.model, "cpu").train()
    torch._dynamo.reset()
    frames = CompileCounterWithBackend("eager")
    compiled = compile_model(model, backend=frames)
    seen = []
    for step in steps:
        model.set_progress(step, total)
        x = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(step))
        compiled(x, x).loss.backward()
        seen.append(frames.frame_count)
    return seen


@pytest.mark.parametrize("top_k, update_every", [(8, 2), (12, 1)])
def test_compiled_some_recompiles_only_for_a_new_statistics_setting(top_k, update_every):
    """seed000_some's top-k warm-up over 100 steps: k = 1 for steps 0-9, 1 + floor((top_k - 1) r)
    with r = (s - 10) / 10 for steps 10-19, then top_k. A compiled forward reads k as a device mask
    (one graph for every k); graphs are compiled only where the statistics setting is new
    (gathered or not with update_every 2), never for a new k or the step number itself."""
    steps = range(24)
    over = [f"model.some.top_k={top_k}", f"model.some.update_every={update_every}"]
    seen = _compiled_steps("seed000_some", over, total=100, steps=steps)
    stats = [s % update_every == 0 for s in steps]
    new_stats = {s for s in steps if s > 0 and stats[s] not in stats[:s]}
    grew = {s for s in steps if s > 0 and seen[s] > seen[s - 1]}
    assert seen[0] > 0 and grew <= new_stats, (sorted(grew), sorted(new_stats))


def test_compiled_moe_does_not_recompile_when_its_noise_starts():
    """The noise is multiplied by a device flag under compile: one graph before and after its start."""
    seen = _compiled_steps("cpu_moe", ["model.moe.noise_start_step=5"], total=100, steps=range(10))
    grew = [s for s in range(1, 10) if seen[s] > seen[s - 1]]
    assert seen[0] > 0 and grew == []


def test_some_forward_reads_no_tensor_value_on_the_host():
    """cpu_some's statistics (centred queries, dormant keys re-seeded at sampled queries) and a
    token sample: outside the functions kept eager on purpose (the dispatch, the host RNG draws),
    the forward traces whole. A host read of a buffer's value (``int(self.som_updates)``) would be
    a graph break here and a host sync per layer on a GPU."""
    cfg = load_config(preset="cpu_some", overrides=SMALL + ["model.some.update_token_fraction=0.5"]).model
    layer = build_ffn(cfg, 1).train()
    layer.set_progress(100, 400)  # past the top-k warm-up, on a statistics step
    torch._dynamo.reset()
    explained = torch._dynamo.explain(layer)(torch.randn(2, 16, cfg.d_model))
    reasons = [b.reason.splitlines()[0] for b in explained.break_reasons]
    assert reasons and all("torch.compiler.disable()" in r for r in reasons), reasons
    assert float(layer.stat_sample_draws) == 1.0 and float(layer.stat_tokens) == 16.0  # the statistics ran
