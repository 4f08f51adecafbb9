"""The SoME cosine router's hand-written backward against autograd through ``F.normalize``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from somoe.models.ffn.some_router import cosine_scores


@pytest.mark.parametrize("tau", [1.0, 0.5, "tensor"])
def test_cosine_scores_and_gradients_equal_autograd_through_normalize(tau):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(7, 8, generator=g, dtype=torch.float64, requires_grad=True)
    keys = torch.randn(5, 8, generator=g, dtype=torch.float64) * 3.0
    probe = torch.randn(7, 5, generator=g, dtype=torch.float64)
    t = torch.tensor(0.7, dtype=torch.float64, requires_grad=True) if tau == "tensor" else tau
    scores, q_hat = cosine_scores(q, keys, t)
    ref = F.normalize(q, dim=-1) @ F.normalize(keys, dim=-1).t() / t
    assert torch.allclose(scores, ref, atol=1e-12) and torch.allclose(q_hat, F.normalize(q, dim=-1), atol=1e-12)
    inputs = [q, t] if tau == "tensor" else [q]
    got = torch.autograd.grad((scores * probe).sum(), inputs)
    want = torch.autograd.grad((ref * probe).sum(), inputs)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-10), (a, b)
    if tau == "tensor":
        assert torch.autograd.gradcheck(lambda q_, t_: cosine_scores(q_, keys, t_)[0], (q, t))
