"""bf16 experts, fp32 sums: the dispatch adds each token's K input-gradient pieces and each expert's
bias-gradient rows in fp32, on the per-expert loop (host counts) and on the grouped path (device
groups, the GPU's), checked on the CPU's bf16 path against fp32 references."""

from __future__ import annotations

import pytest
import torch

from somoe.models.dispatch import dispatch, grouped_mlp

T, D, FF, E, K = 4096, 16, 32, 2, 2  # ~4k rows per expert; widths the grouped kernel takes (16-byte rows)


def _setup():
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(E, D, FF, generator=g) / D ** 0.5, torch.randn(E, FF, generator=g) * 0.1,
          torch.randn(E, FF, D, generator=g) / FF ** 0.5, torch.randn(E, D, generator=g) * 0.1]
    idx_TK = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    gates_TK = torch.softmax(torch.randn(T, K, generator=g), -1)
    x_TD = torch.randn(T, D, generator=g)
    # a gradient with a positive mean, so that an expert's bias gradient is a large sum of same-sign rows
    probe_TD = (1 + 0.25 * torch.randn(T, D, generator=g)).bfloat16().float()
    return [w.requires_grad_(True) for w in ws], idx_TK, gates_TK, x_TD.requires_grad_(True), probe_TD


def _grads(ws, idx_TK, gates_TK, x_TD, probe_TD, bf16: bool, grouped: bool) -> list[torch.Tensor]:
    leaves = [*ws, x_TD]
    for t in leaves:
        t.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        y = dispatch(x_TD, idx_TK, gates_TK, lambda s, c: grouped_mlp(s, c, *ws), E,
                     torch.bfloat16 if bf16 else torch.float32, grouped=grouped)
    (y.float() * probe_TD).sum().backward()
    return [t.grad.clone() for t in leaves]


@pytest.mark.parametrize("grouped", [False, True], ids=["loop", "grouped"])
def test_bias_gradients_of_bf16_experts_are_summed_in_fp32(grouped):
    """fp32 trainable experts under bf16 autocast (the MoE on a GPU): every gradient within 1% of the fp32
    run's largest entry (bf16 matmuls), and db2, a sum of ~4k bf16 rows per expert, within 5e-4: its rows'
    own roundings average out, while a sum rounded to bf16 is off by up to 2^-9 (measured 3.9e-3)."""
    setup = _setup()
    ref = _grads(*setup, bf16=False, grouped=False)
    got = _grads(*setup, bf16=True, grouped=grouped)
    err = {name: float((a - b).abs().max() / b.abs().max())
           for name, a, b in zip(("w1", "b1", "w2", "b2", "x"), got, ref)}
    assert all(a.dtype == torch.float32 for a in got)
    assert all(e < 1e-2 for e in err.values()), err
    assert err["b2"] < 5e-4, err


@pytest.mark.parametrize("grouped", [False, True], ids=["loop", "grouped"])
def test_a_tokens_input_gradient_pieces_are_summed_in_fp32(grouped):
    """Identity experts and gates (1, 2^-9): each slot's gradient piece is exact in bf16 (a bf16 value
    times a power of two), but their sum needs 10 significant bits. Summed in fp32 the input gradient is
    the fp32 reference ``probe * (1 + 2^-9)`` exactly; summed in bf16 the small piece is lost (2^-9 off)."""
    g = torch.Generator().manual_seed(1)
    idx_TK = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    gates_TK = torch.tensor([1.0, 2.0 ** -9]).expand(T, K)
    x_TD = torch.randn(T, D, generator=g, requires_grad=True)
    probe_TD = torch.randn(T, D, generator=g).bfloat16().float()
    y = dispatch(x_TD, idx_TK, gates_TK, lambda s, c: s, E, torch.bfloat16, grouped=grouped)
    (y * probe_TD).sum().backward()
    assert x_TD.grad.dtype == torch.float32
    assert torch.equal(x_TD.grad, probe_TD * (1 + 2.0 ** -9))
