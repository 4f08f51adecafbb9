"""Frozen fp32 experts on the grouped path (the GPU's; here forced on the CPU) under bf16 autocast: cast
to bf16 once and reused, refreshed when the weights change (in place, a load, a move), zero biases left
out; the results are those of casting at every call, bit for bit."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from somoe.config import ModelConfig, SoMEConfig
from somoe.models.dispatch import static_dispatch
from somoe.models.ffn.some import SoMELayer

D = 16


def make(**some) -> SoMELayer:
    c = SoMEConfig(num_experts=8, top_k=2, d_ffn=24, **{"expert_seed": 3, **some})
    return SoMELayer(ModelConfig(d_model=D, n_heads=1, ffn="some", some=c), 0).train()


def uncached(layer: SoMELayer) -> SoMELayer:
    """The layer as it computed before the cache: every call casts, biases always added."""
    layer._frozen.experts = lambda experts, dtype, cast: experts
    return layer


class Calls(TorchDispatchMode):
    """Every ATen call and the storages of its tensor arguments."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        ptrs = [a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)]
        self.calls.append((func, ptrs))
        return func(*args, **(kwargs or {}))


def step(layer: SoMELayer, seed: int = 0) -> tuple[torch.Tensor, ...]:
    x = torch.randn(2, 24, D, generator=torch.Generator().manual_seed(seed), requires_grad=True)
    with static_dispatch(), torch.autocast("cpu", dtype=torch.bfloat16):
        y, _ = layer(x)
    y.float().square().sum().backward()
    grads = (x.grad, *(p.grad.clone() for p in layer.parameters()))
    layer.zero_grad(set_to_none=True)
    return (y.detach(), *grads)


def test_fp32_experts_are_cast_to_bf16_once_and_zero_biases_are_never_read():
    """Steps 1-3: the experts' storage is read by exactly two casts (w1, w2) in the first step and by
    nothing after; the zero biases by nothing at all (before: 4 casts a step, 2 bias casts and gathers)."""
    layer = make()
    w = {layer.expert_w1.untyped_storage().data_ptr(), layer.expert_w2.untyped_storage().data_ptr()}
    b = {layer.expert_b1.untyped_storage().data_ptr(), layer.expert_b2.untyped_storage().data_ptr()}
    reads_w, reads_b = [], []
    for i in range(3):
        with Calls() as calls:
            step(layer, i)
        reads_w.append(sum(1 for _, ptrs in calls.calls if w & set(ptrs)))
        reads_b.append(sum(1 for _, ptrs in calls.calls if b & set(ptrs)))
    assert reads_w == [2, 0, 0] and reads_b == [0, 0, 0], (reads_w, reads_b)


def test_cached_experts_give_the_per_call_casts_results_and_follow_changes():
    """Output, input gradient and every parameter's gradient equal the uncached layer's bit for bit: at
    first, after the experts are changed in place (w1 doubled, b2 set to 0.5: the bias is then read), after
    a load of other experts, and after a move (``.to``)."""
    a, b = make(save_experts="weights"), uncached(make(save_experts="weights"))
    b.load_state_dict(a.state_dict())

    def same():
        for ta, tb in zip(step(a), step(b)):
            assert torch.equal(ta, tb)

    same()
    with torch.no_grad():
        for layer in (a, b):
            layer.expert_w1.mul_(2.0)
            layer.expert_b2.fill_(0.5)
    same()
    other = make(save_experts="weights", expert_seed=11).state_dict()
    a.load_state_dict(other), b.load_state_dict(other)
    same()
    a.to(torch.float64).to(torch.float32), b.to(torch.float64).to(torch.float32)
    same()


def test_a_traced_forward_reads_the_prepared_copy_and_a_load_refreshes_it_in_place():
    """Compiled (dynamo, eager backend): after ``prepare_compute`` the traced forward computes with the copy
    (equal to the uncached layer); a load of other experts rewrites the copy in place, so the same graph
    (no recompile) computes with the new experts."""
    from torch._dynamo.testing import CompileCounter

    a, b = make(save_experts="weights"), uncached(make(save_experts="weights"))
    b.load_state_dict(a.state_dict())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a.prepare_compute(torch.empty(0))
    copy = a._frozen.cast
    torch._dynamo.reset()
    frames = CompileCounter()
    compiled = torch.compile(a, backend=frames, fullgraph=True)
    x = torch.randn(2, 24, D, generator=torch.Generator().manual_seed(5))
    for other_seed in (None, 11):
        if other_seed is not None:
            other = make(save_experts="weights", expert_seed=other_seed).state_dict()
            a.load_state_dict(other), b.load_state_dict(other)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            ya, _ = compiled(x)
            with static_dispatch():  # the path a traced forward takes
                yb, _ = b(x)
        assert torch.equal(ya, yb), (ya.float() - yb.float()).abs().max()
    assert a._frozen.cast is copy and torch.equal(copy[0], a.expert_w1.to(torch.bfloat16))
    assert frames.frame_count == 1
