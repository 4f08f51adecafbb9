"""The SoME layer: gradients, eval purity, statistics under checkpointing and accumulation,
frozen-expert init and hash, readouts, scoring, options, and the seeds' parameter counts."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from somoe.config import ModelConfig, SoMEConfig, load_config
from somoe.models import LM, build_model
from somoe.models.ffn.some import SoMELayer
from somoe.models.ffn.some_experts import ExpertHashMismatch, generate_experts

D = 16


def make_layer(layer_idx=0, d_model=D, **some) -> SoMELayer:
    cfg = SoMEConfig(**{**dict(num_experts=8, top_k=2, d_ffn=24, gamma=0.05), **some})
    cfg.validate()
    torch.manual_seed(0)  # the query net's init
    return SoMELayer(ModelConfig(d_model=d_model, n_heads=1, ffn="some", some=cfg), layer_idx)


def tiny_lm(**some) -> LM:
    cfg = ModelConfig(vocab_size=50, d_model=D, n_layers=2, n_heads=2, max_seq_len=16, positions="rope",
                      tie_embeddings=False, ffn="some",
                      some=SoMEConfig(**{**dict(num_experts=8, top_k=2, d_ffn=24, gamma=0.05), **some}))
    cfg.validate()
    torch.manual_seed(0)
    return build_model(cfg)


def rand(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def snapshot(module):
    return {n: t.detach().clone() for n, t in [*module.named_buffers(), *module.named_parameters()]}


# --- gradients -------------------------------------------------------------------------------
def test_gradient_reaches_query_and_input_but_never_experts_or_keys():
    layer = make_layer()
    x = rand(2, 5, D).requires_grad_(True)
    keys_before = layer.key_store.clone()
    y, aux = layer(x)
    assert aux is None
    (y * rand(2, 5, D, seed=2)).sum().backward()
    assert x.grad.abs().sum() > 0
    assert layer.query.weight.grad.abs().sum() > 0 and layer.query.bias.grad.abs().sum() > 0
    assert sorted(n for n, _ in layer.named_parameters()) == ["query.bias", "query.weight"]
    for name in ("expert_w1", "expert_b1", "expert_w2", "expert_b2", "key_store"):
        t = getattr(layer, name)
        assert not t.requires_grad and t.grad is None
    torch.optim.SGD(layer.parameters(), lr=1.0).step()
    assert torch.equal(layer.key_store, keys_before)  # only self_organize moves keys


def test_learnable_temperature_gets_a_gradient():
    layer = make_layer(learnable_tau=True)
    y, _ = layer(rand(3, D))
    (y * rand(3, D, seed=3)).sum().backward()
    assert layer.log_tau.grad is not None and layer.log_tau.grad.abs() > 0


# --- eval purity -----------------------------------------------------------------------------
def test_eval_leaves_every_buffer_unchanged():
    layer = make_layer()
    layer.eval()
    before = snapshot(layer)
    with torch.no_grad():
        for seed in range(3):
            layer(rand(2, 7, D, seed=seed))
    after = snapshot(layer)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_adapt_at_inference_gathers_in_eval_and_applies_on_request():
    layer = make_layer(adapt_at_inference=True)
    layer.eval()
    keys = layer.key_store.clone()
    with torch.no_grad():
        layer(rand(2, 7, D))
    assert float(layer.stat_tokens) == 14.0
    layer.self_organize_at_inference()
    assert not torch.equal(layer.key_store, keys)
    assert float(layer.stat_tokens) == 0.0
    with torch.no_grad():
        layer(rand(2, 7, D))
    layer.train()  # statistics an adapting eval left behind never reach a training update
    assert all(float(t.abs().sum()) == 0.0 for t in layer.som_statistics())


# --- statistics: checkpointing, accumulation, subsampling ----------------------------------------
def lm_statistics(checkpointing: bool):
    lm = tiny_lm()
    lm.activation_checkpointing = checkpointing
    lm.train()
    idx = torch.randint(0, 50, (3, 16), generator=torch.Generator().manual_seed(4))
    # torch stops a recompute once the tensors backward needs exist, which would skip the
    # statistics code by luck; recompute whole blocks so the test sees the worst case
    with torch.utils.checkpoint.set_checkpoint_early_stop(False):
        lm(idx, idx).loss.backward()
    return [t.clone() for layer in lm.self_organizing_layers() for t in layer.som_statistics()], lm


def test_activation_checkpointing_does_not_count_statistics_twice():
    plain, _ = lm_statistics(False)
    ckpt, lm = lm_statistics(True)
    assert lm.blocks[0].ffn.query.weight.grad is not None  # the recompute did run
    assert float(plain[6]) == 48.0 and float(plain[2].sum()) == 96.0  # 3*16 tokens, k=2 slots each
    assert all(torch.equal(a, b) for a, b in zip(plain, ckpt))


def test_four_micro_batches_equal_one_batch_of_four_times_the_size():
    opts = dict(gamma=0.1, beta=0.01, delta=0.05, theta_percentile=0.3, delta_clip=0.05, key_ema=0.5)
    x = rand(4, 6, D, seed=5)
    whole, micro = make_layer(**opts), make_layer(**opts)
    whole(x)
    for m in range(4):
        micro(x[m:m + 1])
    for a, b in zip(whole.som_statistics(), micro.som_statistics()):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-6)  # fp32; only summation order differs
    whole.self_organize(10, 100)
    micro.self_organize(10, 100)
    assert not torch.equal(whole.key_store, make_layer(**opts).key_store)  # keys did move
    for name in ("key_store", "key_route", "usage_ema", "query_mean_ema", "dormant_streak"):
        assert torch.allclose(getattr(whole, name).float(), getattr(micro, name).float(), rtol=0, atol=1e-6)


def test_token_subsampling_gathers_the_asked_fraction():
    layer = make_layer(update_token_fraction=0.5)
    layer(rand(10, D))
    assert float(layer.stat_tokens) == 5.0 and float(layer.stat_count.sum()) == 10.0  # 5 tokens, k=2


# --- frozen experts ----------------------------------------------------------------------------
def test_sparse_init_has_exact_zeros_per_column_and_variance_preserving_scale():
    t = generate_experts(2, 64, 48, "sparse", 0.75, seed=7, bias=True)
    assert ((t["w1"] == 0).sum(dim=1) == 48).all()  # each of W1's 48 columns: 0.75 * 64 zeros
    assert ((t["w2"] == 0).sum(dim=1) == 36).all()  # each of W2's 64 columns: 0.75 * 48 zeros
    nz = t["w1"][t["w1"] != 0]
    assert nz.std().item() == pytest.approx(1 / math.sqrt(64 * 0.25), rel=0.05)
    assert torch.equal(t["b1"], torch.zeros(2, 48))
    again = generate_experts(2, 64, 48, "sparse", 0.75, seed=7, bias=True)
    assert all(torch.equal(t[k], again[k]) for k in t)
    assert not torch.equal(generate_experts(2, 64, 48, "sparse", 0.75, seed=8, bias=True)["w1"], t["w1"])


def test_experts_are_drawn_on_the_cpu_whatever_the_default_device():
    with torch.device("meta"):  # the LM is built inside `with torch.device(...)`
        inside = generate_experts(2, 8, 12, "sparse", 0.5, seed=3, bias=True)
    outside = generate_experts(2, 8, 12, "sparse", 0.5, seed=3, bias=True)
    assert all(t.device.type == "cpu" and torch.equal(t, outside[k]) for k, t in inside.items())


def test_normal_and_orthogonal_init_scales():
    w1 = generate_experts(4, 64, 48, "normal", 0.0, seed=1, bias=False)["w1"]
    assert w1.std().item() == pytest.approx(1 / 8, rel=0.05)
    t = generate_experts(1, 64, 48, "orthogonal", 0.0, seed=1, bias=False)
    w1, w2 = t["w1"][0], t["w2"][0]  # 64 x 48 and 48 x 64
    assert torch.allclose(w1.t() @ w1, torch.eye(48), atol=1e-5)
    assert torch.allclose(w2 @ w2.t(), torch.eye(48) * 64 / 48, atol=1e-5)
    assert w2.pow(2).mean().sqrt().item() == pytest.approx(1 / math.sqrt(48), rel=1e-4)


def test_each_layer_draws_its_own_experts_and_they_stay_frozen_buffers():
    a, b = make_layer(0), make_layer(1)
    assert not torch.equal(a.expert_w1, b.expert_w1)
    assert torch.equal(a.expert_w1, make_layer(0).expert_w1)
    assert "expert_w1" not in a.state_dict() and "expert_hash" in a.state_dict()
    assert "expert_w1" in make_layer(save_experts="weights").state_dict()
    assert a.frozen_param_count() == 8 * (2 * D * 24 + 24 + D)


def test_expert_hash_round_trip_through_safetensors(tmp_path):
    lm = tiny_lm()
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in lm.state_dict().items()}, str(path))
    fresh = tiny_lm()
    fresh.load_state_dict(load_file(str(path)), strict=True)
    for a, b in zip(lm.ffns(), fresh.ffns()):
        assert torch.equal(a.expert_w1, b.expert_w1)


def test_tampered_or_mismatched_expert_hash_fails_with_one_clear_line():
    state = make_layer().state_dict()
    tampered = dict(state, expert_hash=state["expert_hash"] + 1)
    with pytest.raises(ExpertHashMismatch, match=r"frozen experts regenerated from .*seed=1234") as err:
        make_layer().load_state_dict(tampered)
    assert "\n" not in str(err.value) and "save_experts=weights" in str(err.value)
    with pytest.raises(ExpertHashMismatch):
        make_layer(expert_seed=99).load_state_dict(state)
    make_layer().load_state_dict(state)  # the genuine one loads


def test_bf16_expert_storage_is_close_to_fp32():
    x = rand(4, 5, D)
    y32, _ = make_layer()(x)
    layer16 = make_layer(expert_dtype="bf16")
    assert layer16.expert_w1.dtype == torch.bfloat16
    y16, _ = layer16(x)
    assert y16.dtype == torch.float32
    assert (y16 - y32).abs().max() < 0.03 * y32.abs().max()


# --- routing, scoring, options -------------------------------------------------------------------
def test_dot_scores_temperature_and_aux_loss_by_hand():
    layer = make_layer(d_model=2, num_experts=3, top_k=1, gamma=0.0, key_norm=False, score="dot",
                       router_temperature_train=2.0, aux_loss_coef=0.1)
    with torch.no_grad():
        layer.query.weight.copy_(torch.eye(2))
        layer.query.bias.zero_()
        layer.key_store.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]))
    x = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    s = 1 / (math.sqrt(2) * 2.0)  # 1 / (sqrt(d) * tau)
    expected = [[2 * s, 0.0, -2 * s], [0.0, s, -s]]
    scores, *_ = layer._scores(x)
    assert torch.allclose(scores, torch.tensor(expected), atol=1e-6)
    _, aux = layer(x)
    # top-1 picks expert 0 then expert 1: f = (1/2, 1/2, 0); P = mean of the full softmax rows
    probs = [[math.exp(v) / sum(math.exp(u) for u in row) for v in row] for row in expected]
    P = [(probs[0][e] + probs[1][e]) / 2 for e in range(3)]
    assert aux.item() == pytest.approx(0.1 * 3 * (0.5 * P[0] + 0.5 * P[1]), rel=1e-5)
    layer.eval()  # eval temperature 0.5 and no aux loss
    scores_eval, *_ = layer._scores(x)
    assert torch.allclose(scores_eval, torch.tensor(expected) * 4.0, atol=1e-5)
    assert layer(x)[1] is None


def test_cosine_scores_use_unit_queries_and_keys():
    layer = make_layer(d_model=2, num_experts=2, top_k=1, gamma=0.0, key_norm=True)
    with torch.no_grad():
        layer.query.weight.copy_(torch.eye(2))
        layer.query.bias.zero_()
        layer.key_store.copy_(torch.tensor([[3.0, 0.0], [0.0, 0.5]]))
    scores, *_ = layer._scores(torch.tensor([[5.0, 5.0]]))
    assert torch.allclose(scores, torch.tensor([[1 / math.sqrt(2)] * 2]), atol=1e-6)  # tau 1


@pytest.mark.parametrize("router_dtype", ["fp32", "autocast"])
def test_router_precision_inside_a_bf16_autocast_forward(router_dtype):
    """``router_dtype: fp32`` scores in fp32 inside bf16 autocast, equal to the scores without it;
    ``autocast`` scores in bf16 like every other layer: within bf16 rounding of them, not equal."""
    layer = make_layer(d_model=32, num_experts=16, top_k=4, score="cosine", router_dtype=router_dtype)
    x = rand(64, 32)
    ref, *_ = layer._scores(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, *_ = layer._scores(x)
    if router_dtype == "fp32":
        assert got.dtype == torch.float32 and torch.equal(got, ref)
    else:
        assert got.dtype == torch.bfloat16 and 0 < (got.float() - ref).abs().max() < 0.02


def test_top_k_warmup_applies_in_forward():
    layer = make_layer(top_k=4, topk_warmup=0.5)
    layer.set_progress(0, 10)
    idx, gates = layer.route(rand(3, 5, D))
    assert idx.shape == (3, 5, 1) and torch.equal(gates, torch.ones(3, 5, 1))
    layer(rand(6, D))
    assert float(layer.stat_count.sum()) == 6.0
    layer.set_progress(5, 10)
    assert layer.route(rand(3, D))[0].shape == (3, 4)


def test_lora_starts_as_a_no_op_and_trains():
    x = rand(6, D)
    plain, adapted = make_layer(), make_layer(lora_rank=2, lora_alpha=4.0)
    adapted.query.load_state_dict(plain.query.state_dict())
    y_plain, _ = plain(x)
    y_lora, _ = adapted(x)
    assert torch.allclose(y_plain, y_lora, atol=1e-6)
    (y_lora * rand(6, D, seed=9)).sum().backward()
    assert adapted.lora_b1.grad.abs().sum() > 0 and adapted.lora_b2.grad.abs().sum() > 0
    extra = sum(p.numel() for n, p in adapted.named_parameters() if n.startswith("lora"))
    assert extra == 8 * (D * 2 + 2 * 24 + 24 * 2 + 2 * D)


# --- readouts -----------------------------------------------------------------------------------
def test_readouts_match_an_independent_computation():
    layer = make_layer(num_experts=6, top_k=3)
    layer.eval()
    xs = [rand(4, 5, D, seed=s) for s in (11, 12)]
    layer.reset_readouts()
    with torch.no_grad():
        for x in xs:
            layer(x)
    idx = torch.cat([layer.route(x)[0].reshape(-1, 3) for x in xs])
    gates = torch.cat([layer.route(x)[1].reshape(-1, 3) for x in xs])
    counts = [float((idx == e).sum()) for e in range(6)]
    p = [c / sum(counts) for c in counts]
    g = sum(abs(a - b) for a in p for b in p) / (2 * 6)
    h = -sum(q * math.log2(q) for q in p if q > 0)
    gate_h = float(-(gates * gates.log()).sum(-1).mean())
    r = layer.readouts()
    assert r["usage_gini"] == pytest.approx(g, abs=1e-9)
    assert r["usage_entropy_bits"] == pytest.approx(h, abs=1e-9)
    assert r["usage_entropy_norm"] == pytest.approx(h / math.log2(6), abs=1e-9)
    assert r["gate_entropy_nats"] == pytest.approx(gate_h, rel=1e-5)
    assert r["dropped_pct"] == 0.0 and r["dormant"] == 0.0 and r["key_norm_mean"] == pytest.approx(1.0)
    unit = torch.nn.functional.normalize(layer.key_store, dim=1)
    cos = [float(unit[i] @ unit[j]) for i in range(6) for j in range(6) if i != j]
    assert r["key_cos_mean"] == pytest.approx(sum(cos) / len(cos), abs=1e-6)
    assert r["key_cos_max"] == pytest.approx(max(cos), abs=1e-6)
    layer.reset_readouts()
    assert "usage_gini" not in layer.readouts()


# --- parameter counts of the seeds' presets --------------------------------------------------------
SEED_FIGURES = {  # preset: (reported total, reported trainable)
    "seed000_some": (1.63e9, 18.9e6),
    "mvp_v2": (72.80e6, 5.52e6),
    "mvp_v3": (213.91e6, 12.23e6),
    "mvp_v4": (617.19e6, 12.23e6),
    "mvp_v5": (213.91e6, 12.23e6),
    "mvp_v6": (1526.11e6, 13.71e6),
    "ablation_v3_1": (2037.44e6, 21.55e6),
    "ablation_v3_2": (2711.15e6, 21.55e6),
    "ablation_v3_3": (2711.15e6, 21.55e6),
}


@pytest.mark.parametrize("preset", sorted(SEED_FIGURES))
def test_preset_parameter_counts_match_the_seeds(preset):
    cfg = load_config(preset=preset)
    with torch.device("meta"):
        counts = LM(cfg.model).param_counts()
    total, trainable = SEED_FIGURES[preset]
    assert counts["total"] == pytest.approx(total, rel=0.01)
    assert counts["trainable"] == pytest.approx(trainable, rel=0.01)


def test_seed000_counts_follow_the_spec_formula():
    cfg = load_config(preset="seed000_some")
    with torch.device("meta"):
        counts = LM(cfg.model).param_counts()
    trainable = 2 * 8192 * 512 + 8 * (4 * (512 ** 2 + 512) + 2 * 2 * 512 + 512 ** 2 + 512) + 2 * 512
    frozen = 8 * 128 * (2 * 512 * 1536 + 1536 + 512)
    assert counts["trainable"] == trainable + 8  # + one learnable temperature per layer
    assert counts["total"] == trainable + 8 + frozen


def test_cpu_some_trains_as_many_parameters_as_cpu_gpt2():
    """The main job compares at equal trainable size: cpu_some's query MLP (d -> 512 -> d) has the
    dense FFN's count, plus a LayerScale gain per channel and a temperature per layer."""
    with torch.device("meta"):
        gpt2 = LM(load_config(preset="cpu_gpt2").model).param_counts()
        some = LM(load_config(preset="cpu_some").model).param_counts()
    ffn = 128 * 512 + 512 + 512 * 128 + 128
    assert some["trainable"] == gpt2["trainable"] - 4 * ffn + 4 * (ffn + 128 + 1)
    assert some["total"] == some["trainable"] + 4 * 128 * (2 * 128 * 128 + 128 + 128)


def test_mlp_query_net_has_the_asked_hidden_width():
    layer = make_layer(query_net="mlp", query_hidden=40)
    assert sum(p.numel() for p in layer.query.parameters()) == D * 40 + 40 + 40 * D + D
    y, _ = layer(rand(3, D))
    assert y.shape == (3, D)


@pytest.mark.parametrize("override,message", [
    ("model.some.alpha_floor=0.05", "alpha_floor=0.05 exceeds alpha=0.015"),
    ("model.some.entropy_band=[1.5,2.5]", "entropy_band low=1.5 is unreachable: top_k=4"),
    ("model.some.key_ema=1.0", "key_ema=1.0 must be in"),
    ("model.some.topk_warmup=0.8", "topk_warmup and topk_ramp"),
    ("model.some.theta_percentile=1.0", "theta_percentile=1.0 must be in"),
    ("model.some.delta=-0.1", "delta=-0.1 must be >= 0"),
])
def test_impossible_settings_fail_with_one_clear_line(override, message):
    from somoe.config import ConfigError

    extra = ["model.some.topk_ramp=0.3"] if "topk_warmup" in override else []
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")) as err:
        load_config(preset="debug", overrides=["model.ffn=some", override, *extra])
    assert "\n" not in str(err.value)


def test_centered_queries_route_on_the_offset_from_the_running_mean():
    """center_queries: the centre is the mean raw query of the first update, then an EMA (decay 0.5)."""
    layer = make_layer(d_model=2, num_experts=2, top_k=1, gamma=0.0, key_norm=True, center_queries=True,
                       center_decay=0.5, alpha=0.0, alpha_floor=0.0, beta=0.0, delta=0.0)
    with torch.no_grad():
        layer.query.weight.copy_(torch.eye(2))
        layer.query.bias.zero_()
        layer.key_store.copy_(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))
    x = torch.tensor([[10.0, 1.0], [8.0, -1.0]])  # both point along +x: uncentred, both pick expert 0
    assert layer.route(x)[0].flatten().tolist() == [0, 0]
    layer(x)
    layer.self_organize(1, 10)
    assert layer.query_center.tolist() == [9.0, 0.0]  # first update: the mean raw query itself
    # centred: (1, 1) and (-1, -1) -> cosines (1/sqrt2, -1/sqrt2) and the reverse: experts 0 and 1
    assert layer.route(x)[0].flatten().tolist() == [0, 1]
    scores, *_ = layer._scores(x)
    assert torch.allclose(scores, torch.tensor([[1.0, -1.0], [-1.0, 1.0]]) / math.sqrt(2), atol=1e-6)
    layer(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))  # mean raw query (2, 3)
    layer.self_organize(2, 10)
    assert torch.allclose(layer.query_center, torch.tensor([0.5 * 9 + 0.5 * 2, 0.5 * 0 + 0.5 * 3]))
    center = layer.query_center.clone()
    layer.eval()
    layer(x)  # eval forwards never move the centre
    layer.train()
    assert torch.equal(layer.query_center, center)


def test_layer_scale_multiplies_the_output_per_channel_and_trains():
    plain = make_layer(num_experts=4, top_k=2)
    scaled = make_layer(num_experts=4, top_k=2, layer_scale=0.1)
    assert plain.out_scale is None and scaled.out_scale.tolist() == pytest.approx([0.1] * D)
    scaled.load_state_dict({**plain.state_dict(), "out_scale": scaled.out_scale.detach()})
    with torch.no_grad():
        scaled.out_scale.copy_(torch.linspace(0.1, 0.5, D))
    x = rand(5, D)
    y_plain, y_scaled = plain(x)[0], scaled(x)[0]
    assert torch.allclose(y_scaled, y_plain * torch.linspace(0.1, 0.5, D), atol=1e-6)
    y_scaled.pow(2).sum().backward()
    assert scaled.out_scale.grad is not None and float(scaled.out_scale.grad.abs().sum()) > 0


def test_expert_cache_folder_gives_the_generated_experts_without_drawing_them(tmp_path, monkeypatch):
    """With SOMOE_EXPERT_CACHE set, the first build draws a layer's experts and writes them with their digest;
    a second build of the same recipe reads them (the generator is not called) and gets the same weights and
    hash; another recipe (layer index) gets its own file. Unset, nothing is written."""
    import somoe.models.ffn.some as some_module

    monkeypatch.setenv("SOMOE_EXPERT_CACHE", str(tmp_path))
    first = make_layer(0)
    assert len(list(tmp_path.glob("experts-*.safetensors"))) == 1

    def no_draw(*args, **kwargs):
        raise AssertionError("drew experts that are in the cache")

    monkeypatch.setattr(some_module, "generate_experts", no_draw)
    again = make_layer(0)
    assert torch.equal(first.expert_w1, again.expert_w1) and torch.equal(first.expert_w2, again.expert_w2)
    assert torch.equal(first.expert_b1, again.expert_b1) and int(first.expert_hash) == int(again.expert_hash)
    monkeypatch.undo()
    other = tmp_path / "other"
    monkeypatch.setenv("SOMOE_EXPERT_CACHE", str(other))
    make_layer(1), make_layer(0)
    assert len(list(other.glob("experts-*.safetensors"))) == 2
    monkeypatch.delenv("SOMOE_EXPERT_CACHE")
    make_layer(2)
    assert len(list(other.glob("experts-*.safetensors"))) == 2
