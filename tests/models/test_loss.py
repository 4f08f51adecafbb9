"""The blocked CPU cross-entropy against ``F.cross_entropy(logits.float())``: loss, gradient, ignored targets."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import somoe.models.loss as loss_module
from somoe.models.loss import token_cross_entropy

IGNORE = -100


def _case(dtype, n=300, vocab=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, vocab, generator=g) * 4).to(dtype).requires_grad_(True)
    targets = torch.randint(0, vocab, (n,), generator=g)
    targets[::5] = IGNORE
    return logits, targets


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_blocked_loss_and_gradient_equal_pytorch(dtype, monkeypatch):
    monkeypatch.setattr(loss_module, "BLOCK_ROWS", 64)  # 300 rows: four full blocks and a partial one
    logits, targets = _case(dtype)
    before = logits.detach().clone()
    want = F.cross_entropy(logits.float(), targets, ignore_index=IGNORE)
    (want_grad,) = torch.autograd.grad(want * 2.5, logits)
    got = token_cross_entropy(logits, targets, IGNORE)
    (got_grad,) = torch.autograd.grad(got * 2.5, logits)
    assert got.dtype == torch.float32 and got_grad.dtype == dtype
    assert abs(got.item() - want.item()) <= 1e-6 * want.item()
    # fp32: the same math to rounding; bf16: both round an fp32 gradient once
    tol = 1e-6 if dtype == torch.float32 else 2 ** -8
    assert (got_grad.float() - want_grad.float()).abs().max() <= tol * want_grad.float().abs().max()
    assert got_grad[::5].abs().max() == 0  # ignored rows get no gradient
    assert torch.equal(logits.detach(), before)  # backward works on copies, never on the logits


def test_all_targets_ignored_gives_zero_loss_and_gradient():
    logits, targets = _case(torch.float32, n=10)
    targets.fill_(IGNORE)
    loss = token_cross_entropy(logits, targets, IGNORE)
    (grad,) = torch.autograd.grad(loss, logits)
    assert loss.item() == 0.0 and grad.abs().max() == 0  # F.cross_entropy would give nan here
