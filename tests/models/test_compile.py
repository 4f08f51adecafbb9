"""torch.compile of a SoME model: the same losses and gradients as eager over several steps whose
routing differs, and no frame compiled after the second step (the expert dispatch runs eagerly,
models/dispatch.py says why)."""

from __future__ import annotations

import torch
from torch._dynamo.testing import CompileCounterWithBackend

from somoe.config import load_config
from somoe.models.dispatch import expert_counts
from somoe.models.transformer import build_model

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
    # steps 0-1 compile (step 1 sees the routing tallies allocated); steps 2-3 route differently
    # and must reuse those graphs
    assert compiled_frames[0] > 0 and compiled_frames[3] == compiled_frames[1]
