"""The classic noisy top-k MoE: eval determinism, aux losses by hand, capacity drops, dispatch
against a naive loop (GELU and SwiGLU experts), dense equivalence, trainability and sizes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from somoe.config import ModelConfig, MoEConfig, TrainConfig
from somoe.models import build_model
from somoe.models.dispatch import dispatch, grouped_swiglu
from somoe.models.ffn.dense import DenseFFN
from somoe.models.ffn.moe import MoELayer, capacity_keep, cv_squared
from somoe.models.sizing import count_params
from somoe.train.optim import build_optimizer
from somoe.experiments.upcycle import copy_dense_into_experts

D = 12


def model_cfg(backbone="gpt2", d_model=D, **moe) -> ModelConfig:
    swiglu = backbone == "smollm"
    cfg = ModelConfig(backbone=backbone, vocab_size=40, d_model=d_model, n_layers=2, n_heads=2, max_seq_len=16,
                      positions="rope" if swiglu else "learned", activation="swiglu" if swiglu else "gelu",
                      d_ffn=20, ffn="moe", moe=MoEConfig(**{**dict(num_experts=5, top_k=2), **moe}))
    cfg.moe.validate()
    cfg.validate()
    return cfg


def make_layer(backbone="gpt2", router_std=1.0, seed=0, **moe) -> MoELayer:
    torch.manual_seed(seed)
    layer = MoELayer(model_cfg(backbone, **moe))
    with torch.no_grad():  # a non-trivial router (the init is zero, which ties every logit)
        layer.router.weight.normal_(0.0, router_std)
        if layer.noise is not None:
            layer.noise.weight.normal_(0.0, 1.0)
        for p in (layer.expert_w1, layer.expert_w2, layer.expert_wg):
            if p is not None:
                p.normal_(0.0, 0.3)
        for p in (layer.expert_b1, layer.expert_b2):
            if p is not None:
                p.normal_(0.0, 0.1)
    return layer


def rand(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --- noisy gating -----------------------------------------------------------------------------
def test_noise_is_off_in_eval_and_the_same_input_gets_the_same_experts():
    layer = make_layer()
    x = rand(3, 7, D)
    layer.eval()
    idx_a, gates_a = layer.route(x)
    idx_b, gates_b = layer.route(x)
    assert torch.equal(idx_a, idx_b) and torch.equal(gates_a, gates_b)
    assert torch.equal(layer(x)[0], layer(x)[0])
    # eval routing is exactly the clean top-k of x W_g
    clean = x.reshape(-1, D) @ layer.router.weight.t()
    assert torch.equal(idx_a.reshape(-1, 2), clean.topk(2, dim=-1).indices)
    # training forwards do add noise: the routes of 21 tokens move away from the clean ones
    layer.train()
    noisy = [layer.route(x) for _ in range(3)]
    assert all(not torch.allclose(gates, gates_a) for _, gates in noisy)
    assert any(not torch.equal(idx, idx_a) for idx, _ in noisy)


def test_noise_starts_at_noise_start_step():
    layer = make_layer(noise_start_step=3)
    x = rand(4, 6, D)
    layer.eval()
    clean_idx, clean_gates = layer.route(x)
    layer.train()
    layer.set_progress(2, 10)  # before the start step: a training forward is noise-free
    assert not layer.noise_active()
    idx, gates = layer.route(x)
    assert torch.equal(idx, clean_idx) and torch.allclose(gates, clean_gates)
    layer.set_progress(3, 10)
    assert layer.noise_active()
    routes = [layer.route(x)[1] for _ in range(3)]
    assert any(not torch.allclose(g, clean_gates) for g in routes)


# --- auxiliary losses by hand ----------------------------------------------------------------
def tiny_routed_layer(aux_loss: str, coef=0.5):
    """E=3, K=1, D=3: tokens e0, e0, e1, e2 with router 2*I give logits 2 at the token's own expert."""
    layer = MoELayer(ModelConfig(d_model=3, n_heads=1, d_ffn=4, ffn="moe",
                                 moe=MoEConfig(num_experts=3, top_k=1, noisy_gating=False, aux_loss=aux_loss,
                                               aux_loss_coef=coef)))
    with torch.no_grad():
        layer.router.weight.copy_(2.0 * torch.eye(3))
    x = torch.eye(3)[[0, 0, 1, 2]].unsqueeze(0)
    return layer.train(), x


def test_switch_aux_loss_equals_hand_computation():
    layer, x = tiny_routed_layer("switch")
    _, aux = layer(x)
    hi, lo = math.exp(2) / (math.exp(2) + 2), 1 / (math.exp(2) + 2)  # softmax of (2, 0, 0)
    f = [2 / 4, 1 / 4, 1 / 4]  # top-1 slots: experts 0, 0, 1, 2
    P = [(2 * hi + 2 * lo) / 4, (hi + 3 * lo) / 4, (hi + 3 * lo) / 4]
    expected = 0.5 * 3 * sum(fe * pe for fe, pe in zip(f, P))
    assert aux.item() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(0.5 * 1.08507, rel=1e-4)


def test_importance_load_aux_loss_equals_hand_computation():
    layer, x = tiny_routed_layer("importance_load")
    _, aux = layer(x)
    # top-1 gates are 1: importance = load = (2, 1, 1); CV^2 = var/mean^2 = (2/9)/(16/9) = 1/8 each
    assert cv_squared(torch.tensor([2.0, 1.0, 1.0])).item() == pytest.approx(1 / 8)
    assert aux.item() == pytest.approx(0.5 * (1 / 8 + 1 / 8), rel=1e-6)


def test_smooth_load_equals_shazeer_formula_by_hand():
    layer = MoELayer(ModelConfig(d_model=3, n_heads=1, d_ffn=4, ffn="moe",
                                 moe=MoEConfig(num_experts=3, top_k=1, aux_loss="importance_load")))
    clean = torch.tensor([[1.0, 0.0, -1.0]])
    noisy = torch.tensor([[1.5, 0.2, -1.0]])
    std = torch.tensor([[1.0, 2.0, 0.8]])

    def phi(z):
        return 0.5 * (1 + math.erf(z / math.sqrt(2)))

    # expert 0 is in the top 1: it must beat the best other (0.2); experts 1 and 2 must beat 1.5
    expected = [phi((1 - 0.2) / 1.0), phi((0 - 1.5) / 2.0), phi((-1 - 1.5) / 0.8)]
    got = layer._smooth_load(noisy, clean, std)
    assert got.tolist() == pytest.approx(expected, rel=1e-5)


def test_aux_loss_only_in_training_and_gradient_reaches_the_router():
    layer = make_layer(aux_loss="switch", aux_loss_coef=0.1)
    x = rand(2, 8, D)
    layer.eval()
    assert layer(x)[1] is None
    layer.train()
    y, aux = layer(x)
    (y.square().mean() + aux).backward()
    assert layer.router.weight.grad.abs().sum() > 0
    assert layer.expert_w1.grad.abs().sum() > 0 and layer.expert_b2.grad.abs().sum() > 0
    assert layer.noise.weight.grad.abs().sum() > 0  # the noise scale is learned through the kept gates


# --- capacity ---------------------------------------------------------------------------------
def test_capacity_drops_are_counted_and_contribute_nothing():
    # E=2, K=1, T=6, cf=1: capacity ceil(6/2) = 3; five tokens want expert 0, so its last two are dropped
    layer = MoELayer(ModelConfig(d_model=2, n_heads=1, d_ffn=4, ffn="moe",
                                 moe=MoEConfig(num_experts=2, top_k=1, noisy_gating=False, capacity_factor=1.0)))
    with torch.no_grad():
        layer.router.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        layer.expert_b2.fill_(1.0)  # every kept token gets a non-zero output
    x = torch.tensor([[1.0, 0], [1, 0], [0, 1], [1, 0], [1, 0], [1, 0]]).unsqueeze(0)
    layer.eval()
    layer.reset_readouts()
    y, _ = layer(x)
    dropped_rows = (y[0].abs().sum(-1) == 0).nonzero().flatten().tolist()
    assert dropped_rows == [4, 5]  # token order within expert 0: tokens 0, 1, 3 fit
    assert layer.readouts()["dropped_pct"] == pytest.approx(100 * 2 / 6)
    layer(x)  # the share accumulates over forwards until reset
    assert layer.readouts()["dropped_pct"] == pytest.approx(100 * 4 / 12)


def test_capacity_gives_first_choices_priority():
    # E=3, K=2, T=3, cf=1: capacity ceil(3*2/3) = 2. Expert 0 is wanted by t0 (1st), t1 (1st), t2 (2nd):
    # the first choices fill it, so t2's second choice is the only drop.
    idx = torch.tensor([[0, 1], [0, 2], [1, 0]])
    keep = capacity_keep(idx, 3, 1.0)
    assert keep.tolist() == [[True, True], [True, True], [True, False]]
    assert capacity_keep(idx, 3, 0.0) is None  # dropless
    assert capacity_keep(idx, 3, 2.0).all()  # capacity 4 fits everything


# --- dispatch against a naive loop -------------------------------------------------------------
def naive_forward(layer: MoELayer, x_TD: torch.Tensor) -> torch.Tensor:
    """One token at a time: clean top-k, softmax over the kept k, each expert by hand."""
    rows = []
    for x in x_TD:
        logits = x @ layer.router.weight.t()
        top, idx = logits.topk(layer.cfg.top_k)
        gates = torch.softmax(top, -1)
        y = torch.zeros(layer.d_model)
        for g, e in zip(gates, idx.tolist()):
            if layer.swiglu:
                h = F.silu(x @ layer.expert_wg[e]) * (x @ layer.expert_w1[e])
                y = y + g * (h @ layer.expert_w2[e])
            else:
                h = F.gelu(x @ layer.expert_w1[e] + layer.expert_b1[e])
                y = y + g * (h @ layer.expert_w2[e] + layer.expert_b2[e])
        rows.append(y)
    return torch.stack(rows)


@pytest.mark.parametrize("backbone", ["gpt2", "smollm"])
def test_moe_forward_equals_a_naive_per_token_loop(backbone):
    layer = make_layer(backbone).eval()
    x = rand(3, 11, D)
    with torch.no_grad():
        y, _ = layer(x)
        expected = naive_forward(layer, x.reshape(-1, D))
    assert torch.allclose(y.reshape(-1, D), expected, atol=1e-5)
    assert expected.abs().mean() > 0.1  # the comparison is not between zeros


def test_grouped_swiglu_through_dispatch_equals_naive_loop_with_gradients():
    T, E, K, F_ = 17, 4, 2, 9
    g = torch.Generator().manual_seed(0)
    wg, wu, wd = torch.randn(E, D, F_, generator=g), torch.randn(E, D, F_, generator=g), torch.randn(E, F_, D, generator=g)
    for w in (wg, wu, wd):
        w.requires_grad_(True)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    gates = torch.softmax(torch.randn(T, K, generator=g), -1)
    x = torch.randn(T, D, generator=g, requires_grad=True)
    y = dispatch(x, idx, gates, lambda xs, c: grouped_swiglu(xs, c, wg, wu, wd), E)
    ref = torch.stack([sum(gates[t, j] * ((F.silu(x[t] @ wg[e]) * (x[t] @ wu[e])) @ wd[e])
                           for j, e in enumerate(idx[t].tolist())) for t in range(T)])
    assert torch.allclose(y, ref, atol=1e-4)
    (gy,) = torch.autograd.grad(y.sum(), [wg])
    (gr,) = torch.autograd.grad(ref.sum(), [wg])
    assert torch.allclose(gy, gr, atol=1e-3)


# --- equivalence with the dense FFN ----------------------------------------------------------------
@pytest.mark.parametrize("backbone", ["gpt2", "smollm"])
def test_one_expert_top1_equals_the_dense_ffn_it_was_copied_from(backbone):
    cfg = model_cfg(backbone, num_experts=1, top_k=1)
    torch.manual_seed(0)
    dense = DenseFFN(cfg)
    with torch.no_grad():
        for p in dense.parameters():
            p.normal_(0.0, 0.3)
    moe = MoELayer(cfg)
    copy_dense_into_experts(moe, dense)
    x = rand(2, 9, D)
    for mode in (False, True):  # eval, and training (noise cannot change a single expert's gate of 1)
        dense.train(mode)
        moe.train(mode)
        assert torch.allclose(moe(x)[0], dense(x)[0], atol=1e-6, rtol=0)
    assert dense(x)[0].abs().mean() > 0.1


# --- readouts, trainability, sizes ---------------------------------------------------------------
def test_readouts_match_the_routed_counts():
    layer = make_layer().eval()
    x = rand(4, 10, D)
    layer.reset_readouts()
    layer(x)
    idx, gates = layer.route(x)
    counts = torch.bincount(idx.flatten(), minlength=5).double()
    shares = counts / counts.sum()
    nz = shares[shares > 0]
    r = layer.readouts()
    assert r["usage_entropy_bits"] == pytest.approx(float(-(nz * nz.log2()).sum()))
    assert r["usage_entropy_norm"] == pytest.approx(r["usage_entropy_bits"] / math.log2(5))
    gate_h = -(gates * gates.log()).sum(-1).mean()
    assert r["gate_entropy_nats"] == pytest.approx(float(gate_h), rel=1e-5)
    assert r["dropped_pct"] == 0.0 and 0.0 <= r["usage_gini"] < 0.8
    layer.reset_readouts()
    assert layer.readouts() == {}


def test_experts_are_trainable_counted_and_their_biases_not_decayed():
    cfg = model_cfg("gpt2")
    counts = count_params(cfg)
    assert counts["trainable"] == counts["total"]
    dense = count_params(ModelConfig(**{**cfg.__dict__, "ffn": "dense"}))
    E, F_, L = 5, 20, 2
    per_expert = 2 * D * F_ + F_ + D
    router = 2 * D * E  # W_g and W_noise, no bias
    assert counts["total"] - dense["total"] == L * ((E - 1) * per_expert + router)
    model = build_model(cfg)
    opt = build_optimizer(model, TrainConfig(weight_decay=0.1), "cpu")
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    ffn = model.blocks[0].ffn
    assert id(ffn.expert_w1) in decayed and id(ffn.router.weight) in decayed
    assert id(ffn.expert_b1) not in decayed and id(ffn.expert_b2) not in decayed
    n_opt = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n_opt == counts["trainable"]


def test_a_tiny_moe_lm_learns_a_batch():
    cfg = model_cfg("smollm", d_model=16)
    torch.manual_seed(0)
    model = build_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randint(0, 40, (4, 16), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(30):
        out = model(x, x.roll(-1, 1))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.ce_loss.item())
    assert out.aux_loss is not None
    assert losses[-1] < losses[0] - 1.0
