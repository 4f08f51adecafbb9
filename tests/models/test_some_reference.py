"""The SoME layer against an independent per-token reference written from docs/some-layer.md, section 2.

The reference loops over tokens with plain tensor ops (no dispatch, no grouped kernels, no layer
method): q = Q(x) (minus the query centre when centred), score = q.K/sqrt(d) or cosine, over the
temperature; the k best by a sort; softmax gates over the selected scores; the gated sum of the
selected frozen experts act(x W1 + b1) W2 + b2 (with LoRA: W + scale A B); LayerScale on the output.
Output and every trainable gradient (and the input's) must agree at 1e-5 in fp32 (relative, for
values above 1).
"""

import math

import pytest
import torch
import torch.nn.functional as F

from layer_reference import run_both
from somoe.config import ModelConfig, SoMEConfig
from somoe.models.ffn.some import SoMELayer

TOL = 1e-5


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Within 1e-5, relative to the reference's scale where that exceeds 1 (fp32 sums of O(1) terms)."""
    return bool((a - b).abs().max() <= TOL * max(1.0, float(b.abs().max())))


def reference_forward(layer: SoMELayer, x_TD: torch.Tensor, c: SoMEConfig, training: bool) -> torch.Tensor:
    d = x_TD.shape[-1]
    keys = (layer.key_route if c.key_ema > 0 else layer.key_store).detach()
    tau = c.router_temperature_train if training else c.router_temperature_eval
    if c.learnable_tau:
        tau = tau * torch.exp(layer.log_tau)
    lora = c.lora_rank > 0
    scale = c.lora_alpha / c.lora_rank if lora else 0.0
    rows = []
    for t in range(x_TD.shape[0]):
        x = x_TD[t]
        if c.query_net == "linear":
            q = layer.query.weight @ x + layer.query.bias
        else:
            first, last = layer.query[0], layer.query[2]
            q = last.weight @ F.gelu(first.weight @ x + first.bias) + last.bias
        if c.center_queries:
            q = q - layer.query_center
        scores = []
        for e in range(c.num_experts):
            if c.score == "cosine" or c.key_norm:
                s = torch.dot(q, keys[e]) / (q.norm().clamp_min(1e-12) * keys[e].norm().clamp_min(1e-12))
            else:
                s = torch.dot(q, keys[e]) / math.sqrt(d)
            scores.append(s / tau)
        chosen = sorted(range(c.num_experts), key=lambda e: -float(scores[e].detach()))[:layer.top_k_now]
        selected = torch.stack([scores[e] for e in chosen])
        gates = torch.exp(selected - selected.max())
        gates = gates / gates.sum()
        y = torch.zeros(d)
        for g, e in zip(gates, chosen):
            w1, w2 = layer.expert_w1[e], layer.expert_w2[e]
            if lora:
                w1 = w1 + scale * layer.lora_a1[e] @ layer.lora_b1[e]
                w2 = w2 + scale * layer.lora_a2[e] @ layer.lora_b2[e]
            h = x @ w1 + (layer.expert_b1[e] if c.expert_bias else 0.0)
            y = y + g * (F.gelu(h) @ w2 + (layer.expert_b2[e] if c.expert_bias else 0.0))
        if c.layer_scale > 0:
            y = y * layer.out_scale
        rows.append(y)
    return torch.stack(rows)


def build(E, k, d, **some) -> tuple[SoMELayer, SoMEConfig]:
    c = SoMEConfig(num_experts=E, top_k=k, d_ffn=2 * d + 4, init_method="normal", expert_seed=7, **some)
    layer = SoMELayer(ModelConfig(d_model=d, n_heads=1, ffn="some", some=c), layer_idx=0)
    gen = torch.Generator().manual_seed(E * 100 + k * 10 + d)
    with torch.no_grad():  # move everything off its initial value, so no term is silently zero or one
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        for name in ("expert_b1", "expert_b2", "key_store", "query_center", "key_route"):
            buf = getattr(layer, name, None)
            if buf is not None:
                buf.copy_(torch.randn(buf.shape, generator=gen) * 0.5)
    layer.set_progress(10, 100)
    return layer, c


CASES = {  # (E, k, d), layer options
    "k1-dot": ((4, 1, 8), dict(score="dot", key_norm=False)),
    "kE-cosine": ((6, 6, 8), dict()),
    "E8k2-centred-layerscale": ((8, 2, 16), dict(center_queries=True, layer_scale=0.1)),
    "E16k4-learnable-tau-mlp": ((16, 4, 12), dict(learnable_tau=True, query_net="mlp", query_hidden=10,
                                                  score="dot", key_norm=False)),
    "E5k3-lora-keyema-nobias": ((5, 3, 8), dict(lora_rank=2, lora_alpha=3.0, key_ema=0.5, expert_bias=False)),
    "E8k3-cosine-learnable-tau": ((8, 3, 8), dict(learnable_tau=True)),
    "E12k12-temperature": ((12, 12, 8), dict(router_temperature_train=0.3, score="dot", key_norm=False)),
}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", list(CASES))
def test_layer_matches_the_per_token_reference(case, training):
    (E, k, d), options = CASES[case]
    layer, c = build(E, k, d, **options)
    layer.train(training)
    gen = torch.Generator().manual_seed(99)
    x = torch.randn(2, 5, d, generator=gen)
    upstream = torch.randn(2, 5, d, generator=gen)

    (y_layer, dx_layer, grads_layer), (y_ref, dx_ref, grads_ref) = run_both(
        layer, lambda rows: reference_forward(layer, rows, c, training), x, upstream)

    assert close(y_layer, y_ref)
    assert close(dx_layer, dx_ref)
    assert grads_layer.keys() == grads_ref.keys() and grads_ref  # every trainable tensor, all of them
    for name in grads_ref:
        if k > 1 or not name.startswith(("query", "log_tau")):  # k=1: a gate of 1, the router gets no gradient
            assert grads_ref[name].abs().max() > 0, name  # the reference exercises it
        assert close(grads_layer[name], grads_ref[name]), name
    assert all(b.grad is None for b in layer.buffers())  # keys and frozen experts get none
