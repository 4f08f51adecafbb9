"""The router's scores and the key statistics stay fp32 where fp32 matmuls run on TF32 tensor cores (a GPU
with ``allow_tf32``, as ``train/runtime.py`` sets it). The CPU has no TF32, so it is emulated: a dispatch
mode rounds every fp32 matmul operand to TF32's 10 mantissa bits, as the tensor cores do."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import somoe.models.fp32_matmul as fp32_matmul
from somoe.config import ModelConfig, SoMEConfig
from somoe.models.ffn.some import SoMELayer

aten = torch.ops.aten
# op -> positions of its matrix operands (an addmm's accumulator is added in fp32, not rounded)
MATMULS = {aten.mm.default: (0, 1), aten.bmm.default: (0, 1), aten.mv.default: (0, 1), aten.dot.default: (0, 1),
           aten.addmm.default: (1, 2), aten.addmm_.default: (1, 2), aten.baddbmm.default: (1, 2)}


def to_tf32(t: torch.Tensor) -> torch.Tensor:
    """Round to nearest at TF32's precision (10 explicit mantissa bits)."""
    return ((t.contiguous().view(torch.int32) + (1 << 12)) & -(1 << 13)).view(torch.float32)


class EmulatedTF32(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in MATMULS:
            args = list(args)
            for i in MATMULS[func]:
                if args[i].dtype == torch.float32:
                    args[i] = to_tf32(args[i])
        return func(*args, **(kwargs or {}))


@pytest.fixture
def tf32_on(monkeypatch):
    monkeypatch.setattr(fp32_matmul, "tf32_matmuls", lambda device: True)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def test_split_matmul_is_fp32_accurate_on_tf32_tensor_cores(tf32_on):
    """256 x 512 @ 512 x 64: the emulated TF32 product is ~1e-3 off the fp64 one; the three-product split
    stays within 1e-5 (fp32's own rounding is ~1e-7), and its gradients within TF32's 1e-2."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(256, 512, generator=g, requires_grad=True)
    b = torch.randn(512, 64, generator=g, requires_grad=True)
    ref = a.double() @ b.double()
    with EmulatedTF32():
        plain = a @ b
        split = fp32_matmul.mm(a, b)
        split.sum().backward()
    assert _rel(plain, ref) > 1e-4  # the emulation does round
    assert _rel(split, ref) < 1e-5
    ones = torch.ones(256, 64, dtype=torch.float64)
    assert _rel(a.grad, ones @ b.double().t()) < 1e-2 and _rel(b.grad, a.double().t() @ ones) < 1e-2


def test_some_scores_statistics_and_key_rules_are_fp32_under_tf32(tf32_on):
    """A SoME layer's fp32 router (MLP query net, cosine scores, learnable tau), its gathered statistics
    (with PAD tokens masked) and its key update, run under emulated TF32: within 1e-5 of the exact fp32 run,
    the keys' move within 5e-6 of it (plain TF32 matmuls put the scores ~1e-3 off, enough to flip near-tied
    top-k choices)."""
    c = SoMEConfig(num_experts=16, top_k=4, d_ffn=16, query_net="mlp", query_hidden=48, learnable_tau=True,
                   peer=True, gamma=0.1, beta=0.05, expert_seed=5)
    layers = [SoMELayer(ModelConfig(d_model=32, n_heads=1, ffn="some", some=c), 0).train() for _ in range(2)]
    layers[1].load_state_dict(layers[0].state_dict())
    x = torch.randn(4, 32, 32, generator=torch.Generator().manual_seed(1))
    valid = torch.ones(4, 32, dtype=torch.bool)
    valid[::2, 20:] = False
    scores, stats = [], []
    keys0 = layers[0].key_store.clone()
    for layer, emulate in zip(layers, (False, True)):
        layer.set_progress(5, 10)  # past the rules' warm-up
        with EmulatedTF32() if emulate else torch.no_grad():
            with torch.no_grad():
                scores.append(layer._scores(x.reshape(-1, 32))[0])
                layer(x, valid)
                stats.append({n: layer.get_buffer(n).clone() for n in ("stat_q_sum", "stat_peer_sum", "stat_q_total")})
                layer.self_organize(5, 10)
    assert _rel(scores[1], scores[0]) < 1e-5
    for name in stats[0]:
        assert _rel(stats[1][name], stats[0][name]) < 1e-5, name
    assert _rel(layers[0].key_store - keys0, keys0) > 1e-4  # the rules moved the keys
    # by the same steps: 1e-6 of the move measured (2.7e-5 with the repulsion's matmuls in TF32)
    assert _rel(layers[1].key_store - keys0, layers[0].key_store - keys0) < 5e-6
