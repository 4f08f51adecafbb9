"""Product-key routing against exhaustive scoring of the N composed keys, and the product-key SoME layer
against an independent per-token reference (outputs and every gradient at 1e-5 in fp32).

The reference scores, for each token and head, all n^2 composed keys [C1_i ; C2_j] one by one (dot over
sqrt(d_k), or the sum of the two halves' cosines), keeps the k best by a sort, softmaxes their scores over
the temperature and sums the selected experts act(x W1_e) W2_e, with the weights formed explicitly.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from layer_reference import run_both
from somoe.config import ConfigError, ModelConfig, SoMEConfig
from somoe.models.ffn.some import SoMELayer
from somoe.models.ffn.some_product import MaskedBatchNorm, load_balance_step, product_topk, subkey_scores

TOL = 1e-5


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.detach(), b.detach()
    return bool((a - b).abs().max() <= TOL * max(1.0, float(b.abs().max())))


def exhaustive_topk(q_THd2, C1_Hnd, C2_Hnd, k, cosine, b1_Hn=None, b2_Hn=None):
    """Every composed key scored on its own: (expert ids, scores) of each token and head, best first."""
    T, H = q_THd2.shape[:2]
    n, d = C1_Hnd.shape[1], C1_Hnd.shape[2]
    ids, vals = torch.empty(T, H, k, dtype=torch.long), torch.empty(T, H, k)
    for t in range(T):
        for h in range(H):
            a, b = q_THd2[t, h, :d], q_THd2[t, h, d:]
            if cosine:
                s = (F.cosine_similarity(a[None], C1_Hnd[h], dim=-1, eps=1e-12)[:, None]
                     + F.cosine_similarity(b[None], C2_Hnd[h], dim=-1, eps=1e-12)[None, :])
            else:
                composed = torch.cat([C1_Hnd[h][:, None, :].expand(n, n, d), C2_Hnd[h][None, :, :].expand(n, n, d)], -1)
                s = composed @ q_THd2[t, h] / math.sqrt(d)
            sel = s if b1_Hn is None else s + b1_Hn[h][:, None] + b2_Hn[h][None, :]
            top = torch.sort(sel.flatten(), descending=True).indices[:k]
            ids[t, h], vals[t, h] = top, s.flatten()[top]
    return ids, vals


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("cosine", [False, True], ids=["dot", "cosine"])
@pytest.mark.parametrize("k", [1, 4, 16])
def test_product_topk_is_the_exhaustive_topk(k, cosine, bias):
    n, d, H, T = 16, 6, 2, 12
    gen = torch.Generator().manual_seed(k * 10 + cosine * 2 + bias)
    q = torch.randn(T, H, 2 * d, generator=gen)
    C = torch.randn(2 * H, n, d, generator=gen)  # codebook g = 2h + half
    b = torch.randn(2 * H, n, generator=gen) if bias else None
    table = subkey_scores(q.view(T, 2 * H, d), C, cosine)
    i, j, s = product_topk(table, k, b)
    ids, vals = exhaustive_topk(q, C[0::2], C[1::2], k, cosine,
                                None if b is None else b[0::2], None if b is None else b[1::2])
    assert torch.equal(i * n + j, ids)  # same experts in the same order (no ties in random scores)
    assert close(s, vals)


def build(N=64, k=3, d=8, heads=2, d_k=4, storage="procedural", **some):
    c = SoMEConfig(num_experts=N, top_k=k, d_ffn=6, init_method="normal", expert_seed=11, router="product",
                   pk_heads=heads, pk_dim=d_k, expert_storage=storage, expert_bias=storage == "stored", **some)
    c.validate()
    layer = SoMELayer(ModelConfig(d_model=d, n_heads=1, ffn="some", some=c), layer_idx=1)
    gen = torch.Generator().manual_seed(N + k + d)
    with torch.no_grad():  # every trainable tensor and router buffer away from its initial value
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        for name in ("key_store", "key_route", "query_center", "selection_bias", "expert_b1", "expert_b2"):
            buf = getattr(layer, name, None)
            if buf is not None:
                buf.copy_(torch.randn(buf.shape, generator=gen) * 0.5)
    return layer, c


def expert_weights(layer, e):
    if layer.procedural is not None:
        w1, w2 = layer.procedural.expert_weights(e)
        return w1, None, w2, None
    return layer.expert_w1[e], layer.expert_b1[e], layer.expert_w2[e], layer.expert_b2[e]


def reference_forward(layer, x_TD, c, training):
    d, H, n = x_TD.shape[-1], c.pk_heads, c.subkeys_per_codebook
    dk = c.subkey_dim(d)
    keys = (layer.key_route if c.key_ema > 0 else layer.key_store).detach()
    tau = c.router_temperature_train if training else c.router_temperature_eval
    if c.learnable_tau:
        tau = tau * torch.exp(layer.log_tau)
    first, last = layer.query[0], layer.query[2]
    queries = [last.weight @ F.gelu(first.weight @ x + first.bias) + last.bias for x in x_TD]
    if c.center_queries:
        queries = [q - layer.query_center for q in queries]
    if c.query_batchnorm:
        bn, Q = layer.query_norm, torch.stack(queries)
        mean = Q.mean(0) if training else bn.running_mean
        var = ((Q - Q.mean(0)) ** 2).mean(0) if training else bn.running_var
        queries = [(q - mean) / torch.sqrt(var + bn.eps) * bn.weight + bn.bias for q in queries]
    rows = []
    for x, q in zip(x_TD, queries):
        y = torch.zeros(d)
        for h in range(H):
            a, b = q[2 * h * dk:(2 * h + 1) * dk], q[(2 * h + 1) * dk:(2 * h + 2) * dk]
            scores = {}
            for i in range(n):
                for j in range(n):
                    c1, c2 = keys[2 * h, i], keys[2 * h + 1, j]
                    if c.cosine_scores:
                        s = (torch.dot(a, c1) / (a.norm().clamp_min(1e-12) * c1.norm().clamp_min(1e-12))
                             + torch.dot(b, c2) / (b.norm().clamp_min(1e-12) * c2.norm().clamp_min(1e-12)))
                    else:
                        s = torch.dot(torch.cat([a, b]), torch.cat([c1, c2])) / math.sqrt(dk)
                    bias = 0.0 if c.selection_bias_rate == 0 else float(layer.selection_bias[2 * h, i]
                                                                         + layer.selection_bias[2 * h + 1, j])
                    scores[i * n + j] = (s, float(s.detach()) + bias)
            chosen = sorted(scores, key=lambda e: -scores[e][1])[:c.top_k]
            gates = torch.softmax(torch.stack([scores[e][0] for e in chosen]) / tau, 0)
            for g, e in zip(gates, chosen):
                w1, b1, w2, b2 = expert_weights(layer, e)
                hidden = x @ w1 + (0.0 if b1 is None else b1)
                y = y + g * (F.gelu(hidden) @ w2 + (0.0 if b2 is None else b2))
        rows.append(y * layer.out_scale if c.layer_scale > 0 else y)
    return torch.stack(rows)


CASES = {
    "procedural-dot": dict(score="dot", key_norm=False, query_net="mlp", query_hidden=10),
    "procedural-cosine-bn-centred": dict(query_net="mlp", query_hidden=10, query_batchnorm=True,
                                         center_queries=True, learnable_tau=True, layer_scale=0.3, key_ema=0.5),
    "procedural-bias-temperature": dict(query_net="mlp", query_hidden=7, selection_bias_rate=1e-3,
                                        router_temperature_train=0.4, score="dot", key_norm=False),
    "stored-cosine": dict(storage="stored", query_net="mlp", query_hidden=9, learnable_tau=True),
}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", list(CASES))
def test_product_layer_matches_the_per_token_reference(case, training):
    options = dict(CASES[case])
    layer, c = build(**options)
    layer.train(training)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 4, 8, generator=gen)
    upstream = torch.randn(2, 4, 8, generator=gen)

    (y_layer, dx_layer, grads_layer), (y_ref, dx_ref, grads_ref) = run_both(
        layer, lambda rows: reference_forward(layer, rows, c, training), x, upstream)

    assert close(y_layer, y_ref)
    assert close(dx_layer, dx_ref)
    assert grads_layer.keys() == grads_ref.keys() and grads_ref
    for name in grads_ref:
        if not (name == "query.2.bias" and c.query_batchnorm):  # BatchNorm removes a constant shift
            assert grads_ref[name].abs().max() > 0, name
        assert close(grads_layer[name], grads_ref[name]), name


def test_subkey_statistics_by_hand():
    """S_i, G_i, n_i per sub-key: summed over every slot whose expert lies in row (column) i."""
    layer, c = build(score="dot", key_norm=False, query_net="mlp", query_hidden=5, decay_target="mean")
    layer.train()
    x = torch.randn(1, 5, 8, generator=torch.Generator().manual_seed(3))
    valid = torch.tensor([[True, True, False, True, True]])
    layer._clear_statistics()
    with torch.no_grad():
        layer(x, valid)
        q_TQ, _, i, j, logits = layer._route_product(x.view(-1, 8), valid.view(-1).float())
    gates = torch.softmax(logits / layer.temperature(), -1)
    n, H, dk = c.subkeys_per_codebook, c.pk_heads, c.subkey_dim(8)
    S, G, cnt = torch.zeros(2 * H, n, dk), torch.zeros(2 * H, n), torch.zeros(2 * H, n)
    for t in range(5):
        if not valid[0, t]:
            continue
        for h in range(H):
            for s in range(c.top_k):
                for half, row in ((0, i[t, h, s]), (1, j[t, h, s])):
                    g = 2 * h + half
                    S[g, row] += gates[t, h, s] * q_TQ[t, g * dk:(g + 1) * dk]
                    G[g, row] += gates[t, h, s]
                    cnt[g, row] += 1
    assert torch.allclose(layer.stat_q_sum, S, atol=1e-6)
    assert torch.allclose(layer.stat_gate, G, atol=1e-6)
    assert torch.equal(layer.stat_count, cnt)
    assert float(layer.stat_tokens) == 4.0
    assert cnt.sum() == 4 * H * c.top_k * 2  # each counted slot once per codebook half


def test_rules_act_within_each_codebook():
    """One update of the stacked codebooks equals the exhaustive layer's rules run on each codebook alone."""
    from somoe.models.ffn import some_rules as rules

    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(3, 5, 4, generator=gen)
    usage = torch.rand(3, 5, generator=gen)
    counts = torch.randint(0, 9, (3, 5), generator=gen).float()
    batched = (rules.repulsion_delta(keys, 0.1), rules.updated_usage(usage, counts, 0.9),
               rules.dormant_mask(usage, 1.0, 0.0, 0.4))
    for g in range(3):
        assert torch.allclose(batched[0][g], rules.repulsion_delta(keys[g], 0.1), atol=1e-7)
        assert torch.allclose(batched[1][g], rules.updated_usage(usage[g], counts[g], 0.9))
        assert torch.equal(batched[2][g], rules.dormant_mask(usage[g], 1.0, 0.0, 0.4))
        assert int(batched[2][g].sum()) == 2  # floor(0.4 * 5) least used, per codebook


def test_selection_bias_moves_toward_the_mean_load():
    bias = torch.tensor([[0.0, 0.5, -0.5]])
    load = torch.tensor([[4.0, 1.0, 1.0]])  # mean 2
    assert torch.allclose(load_balance_step(bias, load, 0.01), torch.tensor([[-0.01, 0.51, -0.49]]))
    layer, c = build(selection_bias_rate=0.01, query_net="mlp", query_hidden=5)
    layer.train()
    before = layer.selection_bias.clone()
    layer(torch.randn(2, 6, 8))
    load = layer.stat_count.clone()
    layer.self_organize(1, 10)
    assert torch.allclose(layer.selection_bias, before + 0.01 * torch.sign(load.mean(-1, keepdim=True) - load))


def test_masked_batchnorm_ignores_pad_positions():
    bn = MaskedBatchNorm(3)
    q = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0], [100.0, -100.0, 7.0]])
    out = bn(q, torch.tensor([1.0, 1.0, 0.0]))
    alone = F.batch_norm(q[:2], None, None, training=True, eps=bn.eps)
    assert torch.allclose(out[:2], alone, atol=1e-6)
    assert torch.allclose(bn.running_mean, 0.1 * torch.tensor([2.0, 2.0, 2.0]))


def test_product_router_needs_a_square_pool():
    with pytest.raises(ConfigError, match="not a square"):
        SoMEConfig(num_experts=1000, top_k=4, router="product").validate()
    with pytest.raises(ConfigError, match="sub-keys per codebook"):
        SoMEConfig(num_experts=16, top_k=8, router="product").validate()


def test_no_state_grows_with_experts_times_width():
    """At N = 65,536 every buffer and statistic is O(n d_k) or O(N), none O(N d)."""
    c = SoMEConfig(num_experts=65536, top_k=8, d_ffn=16, init_method="normal", router="product", pk_heads=4,
                   pk_dim=16, expert_storage="procedural", expert_bias=False, decay_target="sample")
    with torch.device("meta"):
        layer = SoMELayer(ModelConfig(d_model=128, n_heads=1, ffn="some", some=c))
    sizes = {name: b.numel() for name, b in layer.named_buffers()}
    sizes.update({f"tally.{name}": b.numel() for name, b in layer._tally.named_buffers()})
    assert max(sizes.values()) <= 65536 * 64 // 4, sizes  # DRAW_TABLE x codebook rows is the largest: 64 G n
    assert sizes["key_store"] == 8 * 256 * 16


def test_pad_positions_leave_the_query_batchnorm_alone():
    """With PAD positions in the batch, the real tokens get what they get in a batch of their own."""
    layer, _ = build(query_net="mlp", query_hidden=5, query_batchnorm=True)
    layer.train()
    x = torch.randn(1, 6, 8, generator=torch.Generator().manual_seed(8))
    valid = torch.tensor([[True, False, True, True, False, True]])
    x_pad = x.clone()
    x_pad[~valid] = 50.0  # PAD rows far from the data: counted, they would move the batch statistics
    y_pad, _ = layer(x_pad, valid)
    mean_pad = layer.query_norm.running_mean.clone()
    layer.query_norm.running_mean.zero_()
    y_real, _ = layer(x[valid].view(1, -1, 8))
    assert torch.allclose(y_pad[valid], y_real.view(-1, 8), atol=1e-6)
    assert torch.allclose(layer.query_norm.running_mean, mean_pad, atol=1e-7)


@pytest.mark.parametrize("preset,base,experts", [("cpu_some_pk", "cpu_some", 65536), ("seed000_some_pk", "seed000_some", 2**20),
                                                  ("seed002_some_pk", "ablation_v3_2", 2**20)])
def test_product_key_presets_cost_at_most_their_bases(preset, base, experts):
    """Active forward FLOPs per token at most the exhaustive model's, at N = 65,536 and at 1,048,576."""
    from somoe.bench.train import model_flops
    from somoe.config import load_config

    def per_token(name, *overrides):
        cfg = load_config(preset=name, overrides=list(overrides))
        return model_flops(cfg.model, 1, cfg.data.seq_len, backward=False) / cfg.data.seq_len

    cfg = load_config(preset=preset)
    assert cfg.model.some.num_experts == experts and cfg.model.some.expert_storage == "procedural"
    assert per_token(preset) <= per_token(base)
    assert per_token(preset, "model.some.num_experts=1048576") <= per_token(base)


def test_route_gives_the_exhaustive_experts_and_the_forwards_gates():
    layer, c = build(score="dot", key_norm=False, query_net="mlp", query_hidden=5)
    layer.eval()
    x = torch.randn(1, 6, 8, generator=torch.Generator().manual_seed(2))
    ids, gates = layer.route(x)
    assert ids.shape == gates.shape == (1, 6, c.pk_heads * c.top_k)
    with torch.no_grad():
        q = layer.query(x.view(-1, 8)).view(6, c.pk_heads, -1)
    keys = layer.key_store
    expected, scores = exhaustive_topk(q, keys[0::2], keys[1::2], c.top_k, cosine=False)
    assert torch.equal(ids.view(6, c.pk_heads, -1), expected)
    tau = c.router_temperature_eval
    assert torch.allclose(gates.view(6, c.pk_heads, -1), torch.softmax(scores / tau, -1), atol=1e-6)


def test_large_pool_readouts_by_hand():
    from somoe.models.ffn.routing_tally import codebook_readouts, coverage_readouts

    r = coverage_readouts(torch.tensor([0, 1, 3, 0]))
    assert r["coverage"] == 0.5 and r["coverage_slots"] == 4.0
    assert abs(r["usage_kl_uniform"] - (math.log(4) + 0.25 * math.log(0.25) + 0.75 * math.log(0.75))) < 1e-12
    assert r["max_violation"] == 3 / 1 - 1  # max load over the mean load (4 slots / 4 experts)
    c = codebook_readouts(torch.tensor([[1, 1, 1, 1], [4, 0, 0, 0]]))
    assert c["codebook_gini_max"] == 0.75 and c["codebook_gini_mean"] == 0.375  # (E-1)/E for one taking all
    assert c["codebook_entropy_norm_mean"] == 0.5
