"""Each self-organizing rule and schedule against numbers worked out by hand (4 experts, d=3).

The expected values are written from the formulas in docs/some-layer.md section 3,
not computed with the code under test. Rules are checked twice where it matters:
as pure functions, and through ``SoMELayer.self_organize`` with only that rule on.
"""

from __future__ import annotations

import math

import pytest
import torch

from somoe.config import ModelConfig, SoMEConfig
from somoe.models.ffn import some_rules as rules
from somoe.models.ffn.some import SoMELayer

KEYS = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
ALL_OFF = dict(attraction=False, peer=False, repulsion=False, decay=False, key_norm=False,
               alpha_schedule="constant", som_warmup_steps=0, theta_percentile=0.0)


def tiny_layer(**some) -> SoMELayer:
    cfg = SoMEConfig(**{**dict(num_experts=4, top_k=2, d_ffn=4), **ALL_OFF, **some})
    cfg.validate()
    layer = SoMELayer(ModelConfig(d_model=3, n_heads=1, ffn="some", some=cfg), 0)
    layer.key_store.copy_(KEYS)
    if cfg.key_ema > 0:
        layer.key_route.copy_(KEYS)
    return layer


def set_stats(layer, q_sum=None, gate=None, count=(1.0, 1.0, 1.0, 1.0), q_total=(0.0, 0.0, 0.0), tokens=4.0):
    layer.stat_count.copy_(torch.tensor(count))
    layer.stat_gate.copy_(torch.tensor(gate if gate is not None else count))
    if q_sum is not None:
        layer.stat_q_sum.copy_(torch.tensor(q_sum))
    layer.stat_q_total.copy_(torch.tensor(q_total))
    layer.stat_tokens.fill_(tokens)


# attraction example: qbar_0 = (1,1,0)/2, expert 1 unused, qbar_2 = (0,1,1)/0.5, qbar_3 = (.5,.5,0)
ATTR_Q_SUM = [[1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 1.0, 1.0], [0.5, 0.5, 0.0]]
ATTR_GATE = [2.0, 0.0, 0.5, 1.0]
# alpha = 0.1: 0.1 * (qbar - k)
ATTR_DELTA = torch.tensor([[-0.05, 0.05, 0.0], [0.0, 0.0, 0.0], [0.0, 0.2, 0.1], [-0.05, -0.05, 0.0]])


def test_attraction_rule():
    delta = rules.attraction_delta(KEYS, torch.tensor(ATTR_Q_SUM), torch.tensor(ATTR_GATE), 0.1)
    assert torch.allclose(delta, ATTR_DELTA, atol=1e-7)
    layer = tiny_layer(attraction=True, alpha=0.1)
    set_stats(layer, q_sum=ATTR_Q_SUM, gate=ATTR_GATE, count=[2.0, 0.0, 1.0, 1.0])
    layer.self_organize(0, 100)
    assert torch.allclose(layer.key_store, KEYS + ATTR_DELTA, atol=1e-7)
    assert all(float(t.abs().sum()) == 0.0 for t in layer.som_statistics())  # cleared after applying


def test_statistics_and_peer_rule_from_a_hand_routing():
    layer = tiny_layer(peer=True, gamma=0.2)
    q_TD = torch.tensor([[1.0, 2.0, 3.0], [0.0, 1.0, 0.0]])
    idx_TK = torch.tensor([[0, 2], [2, 3]])
    gates_TK = torch.tensor([[0.75, 0.25], [0.5, 0.5]])
    layer._accumulate(q_TD, q_TD, idx_TK, gates_TK)
    # Sq_e = sum of g * q over the tokens that chose e
    assert torch.allclose(layer.stat_q_sum, torch.tensor(
        [[0.75, 1.5, 2.25], [0, 0, 0], [0.25, 1.0, 0.75], [0.0, 0.5, 0.0]]))
    assert layer.stat_gate.tolist() == [0.75, 0.0, 0.75, 0.5]
    assert layer.stat_count.tolist() == [1.0, 0.0, 2.0, 1.0]
    assert layer.stat_q_total.tolist() == [1.0, 3.0, 3.0] and float(layer.stat_tokens) == 2.0
    h0 = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert float(layer.stat_gate_entropy) == pytest.approx(h0 + math.log(2), rel=1e-6)
    # co-selected keys weighted by their gates: e0 <- .25 k2; e2 <- .75 k0 + .5 k3; e3 <- .5 k2
    assert torch.allclose(layer.stat_peer_sum, torch.tensor(
        [[0.0, 0.0, 0.25], [0, 0, 0], [1.25, 0.5, 0.0], [0.0, 0.0, 0.5]]))
    assert layer.stat_peer_mass.tolist() == [0.25, 0.0, 1.25, 0.5]
    layer.self_organize(0, 100)
    # pbar_0 = k2, pbar_2 = (1, .4, 0), pbar_3 = k2; delta = 0.2 * (pbar - k)
    expected = KEYS + torch.tensor([[-0.2, 0.0, 0.2], [0, 0, 0], [0.2, 0.08, -0.2], [-0.2, -0.2, 0.2]])
    assert torch.allclose(layer.key_store, expected, atol=1e-6)


REP_KEYS = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0], [-1.0, 0.0, 0.0]])


def test_repulsion_rule():
    # only (k0, k1) point the same way: cos = 1/sqrt(2); negative cosines (k0,k3), (k1,k3) are clipped to 0
    push = 0.3 / 3 * (1 / math.sqrt(2))  # beta * mean over the 3 others
    expected = torch.tensor([[0.0, -push, 0.0], [0.0, push, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    assert torch.allclose(rules.repulsion_delta(REP_KEYS, 0.3), expected, atol=1e-7)
    layer = tiny_layer(repulsion=True, beta=0.3)
    layer.key_store.copy_(REP_KEYS)
    set_stats(layer)
    layer.self_organize(0, 100)
    assert torch.allclose(layer.key_store, REP_KEYS + expected, atol=1e-7)


def test_usage_ema_rule():
    counts = torch.tensor([6.0, 2.0, 0.0, 2.0])
    # 0.9 * 1/4 + 0.1 * n / 10
    expected = torch.tensor([0.285, 0.245, 0.225, 0.245])
    assert torch.allclose(rules.updated_usage(torch.full((4,), 0.25), counts, 0.9), expected)
    layer = tiny_layer(ema_decay=0.9)
    set_stats(layer, count=counts.tolist())
    layer.self_organize(0, 100)
    assert torch.allclose(layer.usage_ema, expected) and float(layer.usage_ema.sum()) == pytest.approx(1.0)
    off = tiny_layer(ema_decay=0.9, usage_ema=False)  # switch off: the step's own share
    set_stats(off, count=counts.tolist())
    off.self_organize(0, 100)
    assert torch.allclose(off.usage_ema, torch.tensor([0.6, 0.2, 0.0, 0.2]))


def test_dormant_by_absolute_theta():
    usage = torch.tensor([0.285, 0.245, 0.225, 0.245])
    # expected slots per step = u * 10 = (2.85, 2.45, 2.25, 2.45); theta 2.4 -> only expert 2
    assert rules.dormant_mask(usage, 10.0, 2.4, 0.0).tolist() == [False, False, True, False]
    assert rules.dormant_mask(usage, 10.0, 2.5, 0.0).tolist() == [False, True, True, True]


def test_dormant_by_percentile():
    usage = torch.tensor([0.1, 0.4, 0.2, 0.3])
    # p = 0.5 of 4 experts -> the 2 least used (0.1 and 0.2), strictly below the 3rd smallest (0.3)
    assert rules.dormant_mask(usage, 100.0, 0.0, 0.5).tolist() == [True, False, True, False]
    assert rules.dormant_mask(usage, 100.0, 0.0, 0.3).tolist() == [True, False, False, False]  # floor(1.2) = 1
    assert not rules.dormant_mask(usage, 100.0, 0.0, 0.05).any()  # floor(0.2) = 0 experts
    assert not rules.dormant_mask(torch.full((4,), 0.25), 100.0, 0.0, 0.5).any()  # even usage: nobody
    assert rules.dormant_mask(torch.tensor([0.1, 0.1, 0.1, 0.7]), 100.0, 0.0, 0.5).sum() == 0  # ties not split


def test_decay_of_dormant_experts_toward_the_mean_query_and_streaks():
    delta = rules.decay_delta(torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 1.0]]), torch.tensor([True, False]),
                              torch.tensor([0.0, 1.0, 0.0]), 0.1)
    assert torch.allclose(delta, torch.tensor([[-0.2, 0.1, 0.0], [0.0, 0.0, 0.0]]))
    layer = tiny_layer(decay=True, delta=0.1, theta=2.0, ema_decay=0.0)
    # usage = n / 10 -> slots (5, 3, 0, 2): experts 2 (0 < 2) dormant, 3 (2 < 2) not
    set_stats(layer, count=[5.0, 3.0, 0.0, 2.0], q_total=[0.0, 4.0, 2.0], tokens=2.0)
    layer.self_organize(0, 100)
    qbar = torch.tensor([0.0, 2.0, 1.0])  # first update: the EMA starts at the step's mean query
    assert torch.allclose(layer.query_mean_ema, qbar)
    expected = KEYS.clone()
    expected[2] = 0.9 * KEYS[2] + 0.1 * qbar
    assert torch.allclose(layer.key_store, expected, atol=1e-7)
    assert layer.dormant_streak.tolist() == [0, 0, 1, 0]
    set_stats(layer, count=[5.0, 0.0, 0.0, 5.0], q_total=[0.0, 0.0, 2.0], tokens=2.0)
    layer.self_organize(1, 100)
    assert layer.dormant_streak.tolist() == [0, 1, 2, 0]
    assert torch.allclose(layer.query_mean_ema, 0.0 * qbar + 1.0 * torch.tensor([0.0, 0.0, 1.0]))  # ema_decay 0


def test_dormancy_counts_the_whole_step_when_statistics_saw_a_fraction_of_the_tokens():
    """update_token_fraction 0.5: the 10 counted slots stand for 20 in the step, so expected slots are
    usage * 20 = (10, 6, 0, 4) and only expert 2 is below theta 3; counted as 10 slots, (5, 3, 0, 2) would
    also put expert 3 below it."""
    layer = tiny_layer(decay=True, delta=0.1, theta=3.0, ema_decay=0.0, update_token_fraction=0.5)
    set_stats(layer, count=[5.0, 3.0, 0.0, 2.0], q_total=[0.0, 4.0, 2.0], tokens=2.0)
    layer.self_organize(0, 100)
    assert layer.dormant_streak.tolist() == [0, 0, 1, 0]
    full = tiny_layer(decay=True, delta=0.1, theta=3.0, ema_decay=0.0)  # every token seen: 10 slots
    set_stats(full, count=[5.0, 3.0, 0.0, 2.0], q_total=[0.0, 4.0, 2.0], tokens=2.0)
    full.self_organize(0, 100)
    assert full.dormant_streak.tolist() == [0, 0, 1, 1]


def test_key_norm_renormalises_after_the_update():
    layer = tiny_layer(attraction=True, alpha=0.1, key_norm=True)
    set_stats(layer, q_sum=ATTR_Q_SUM, gate=ATTR_GATE, count=[2.0, 0.0, 1.0, 1.0])
    layer.self_organize(0, 100)
    raw = KEYS + ATTR_DELTA
    # e0: (0.95, 0.05, 0) / sqrt(0.905); e3: (0.95, 0.95, 0) / (0.95 sqrt 2)
    assert torch.allclose(layer.key_store[0], torch.tensor([0.95, 0.05, 0.0]) / math.sqrt(0.905), atol=1e-6)
    assert torch.allclose(layer.key_store[3], torch.tensor([1.0, 1.0, 0.0]) / math.sqrt(2), atol=1e-6)
    assert torch.allclose(layer.key_store.norm(dim=1), torch.ones(4), atol=1e-6)
    assert torch.allclose(layer.key_store[1], raw[1])


def test_delta_clip_caps_each_expert_displacement():
    delta = torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.1, 0.0]])
    assert torch.allclose(rules.clip_rows(delta, 1.0), torch.tensor([[0.6, 0.8, 0.0], [0.0, 0.1, 0.0]]))
    assert torch.equal(rules.clip_rows(delta, 0.0), delta)
    layer = tiny_layer(attraction=True, alpha=0.1, delta_clip=0.1)
    set_stats(layer, q_sum=ATTR_Q_SUM, gate=ATTR_GATE, count=[2.0, 0.0, 1.0, 1.0])
    layer.self_organize(0, 100)
    # only expert 2's step (0, .2, .1), norm sqrt(.05) = .2236, exceeds 0.1: scaled to length 0.1
    step2 = torch.tensor([0.0, 0.2, 0.1]) * (0.1 / math.sqrt(0.05))
    assert torch.allclose(layer.key_store[2], KEYS[2] + step2, atol=1e-6)
    assert torch.allclose(layer.key_store[0], KEYS[0] + ATTR_DELTA[0], atol=1e-7)


def test_key_ema_routes_with_a_smoothed_copy():
    layer = tiny_layer(attraction=True, alpha=0.1, key_ema=0.75)
    set_stats(layer, q_sum=ATTR_Q_SUM, gate=ATTR_GATE, count=[2.0, 0.0, 1.0, 1.0])
    layer.self_organize(0, 100)
    assert torch.allclose(layer.key_store, KEYS + ATTR_DELTA, atol=1e-7)
    assert torch.allclose(layer.key_route, 0.75 * KEYS + 0.25 * (KEYS + ATTR_DELTA), atol=1e-7)
    assert layer.routing_keys() is layer.key_route


def test_som_warmup_ramps_every_rate_linearly_from_zero():
    assert [rules.som_ramp(s, 400) for s in (0, 100, 200, 400, 1000)] == [0.0, 0.25, 0.5, 1.0, 1.0]
    assert rules.som_ramp(0, 0) == 1.0
    layer = tiny_layer(attraction=True, alpha=0.1, som_warmup_steps=400)
    set_stats(layer, q_sum=ATTR_Q_SUM, gate=ATTR_GATE, count=[2.0, 0.0, 1.0, 1.0])
    layer.self_organize(100, 1000)
    assert torch.allclose(layer.key_store, KEYS + 0.25 * ATTR_DELTA, atol=1e-7)
    r = tiny_layer(alpha=0.1, gamma=0.2, beta=0.4, delta=0.05, som_warmup_steps=400).rates(300, 1000)
    assert (r.alpha, r.gamma, r.beta, r.delta) == pytest.approx((0.075, 0.15, 0.3, 0.0375))


def test_top_k_warmup_schedule():
    cfg = SoMEConfig(num_experts=16, top_k=8, topk_warmup=0.1, topk_ramp=0.2)
    # k = 1 while step/total < 0.1, then 1 + floor(7 * r) with r = (frac - 0.1) / 0.2
    got = [rules.top_k_at(cfg, s, 1000) for s in (0, 99, 100, 150, 200, 299, 300, 1000)]
    assert got == [1, 1, 1, 2, 4, 7, 8, 8]  # r = 0, .25 (1.75), .5 (3.5), .995 (6.965), 1
    jump = SoMEConfig(num_experts=16, top_k=8, topk_warmup=0.1, topk_ramp=0.0)
    assert [rules.top_k_at(jump, s, 1000) for s in (99, 100)] == [1, 8]
    assert rules.top_k_at(cfg, 0, 0) == 8  # no progress known (a loaded model in eval): full k
    assert rules.top_k_at(SoMEConfig(top_k=4), 0, 1000) == 4


def test_alpha_schedules():
    const = SoMEConfig(alpha=0.015, alpha_schedule="constant")
    cos = SoMEConfig(alpha=0.015, alpha_floor=0.005, alpha_schedule="cosine")
    assert rules.alpha_at(const, 0.7) == 0.015
    # floor + (alpha - floor) * (1 + cos(pi * frac)) / 2
    assert [rules.alpha_at(cos, f) for f in (0.0, 0.5, 1.0)] == pytest.approx([0.015, 0.010, 0.005])
    assert rules.alpha_at(cos, 0.25) == pytest.approx(0.005 + 0.01 * (1 + math.cos(math.pi / 4)) / 2)
    assert rules.alpha_at(cos, 3.0) == pytest.approx(0.005)  # past the end: still the floor


def test_beta_schedules():
    lin = SoMEConfig(beta=3e-3, beta_final=5e-4, beta_schedule="linear")
    cos = SoMEConfig(beta=3e-3, beta_final=5e-4, beta_schedule="cosine")
    assert [rules.beta_at(lin, f) for f in (0.0, 0.25, 1.0)] == pytest.approx([3e-3, 2.375e-3, 5e-4])
    assert rules.beta_at(cos, 0.25) == pytest.approx(5e-4 + 2.5e-3 * (1 + math.cos(math.pi / 4)) / 2)
    assert rules.beta_at(cos, 0.5) == pytest.approx(1.75e-3)
    assert rules.beta_at(SoMEConfig(beta=3e-3, beta_schedule="cosine"), 0.9) == 3e-3  # beta_final -1: constant


def test_entropy_band_nudges_the_temperature():
    layer = tiny_layer(entropy_band=(0.5, 0.6), entropy_band_rate=0.1)
    set_stats(layer)
    layer.stat_gate_entropy.fill_(4 * 0.3)  # mean 0.3 nats < 0.5: too peaked -> raise tau
    layer.self_organize(0, 100)
    assert float(layer.log_tau) == pytest.approx(0.1)
    set_stats(layer)
    layer.stat_gate_entropy.fill_(4 * 0.65)  # above the band: lower tau
    layer.self_organize(1, 100)
    assert float(layer.log_tau) == pytest.approx(0.0, abs=1e-7)
    set_stats(layer)
    layer.stat_gate_entropy.fill_(4 * 0.55)  # inside: unchanged
    layer.self_organize(2, 100)
    assert float(layer.log_tau) == pytest.approx(0.0, abs=1e-7)


def test_update_every_skips_statistics_and_rules_on_other_steps():
    layer = tiny_layer(attraction=True, alpha=0.1, update_every=2)
    x = torch.randn(5, 3)
    layer.set_progress(1, 100)
    layer(x)
    assert float(layer.stat_tokens) == 0.0  # step 1 is not an update step: nothing gathered
    set_stats(layer, q_sum=ATTR_Q_SUM, gate=ATTR_GATE, count=[2.0, 0.0, 1.0, 1.0])
    layer.self_organize(1, 100)
    assert torch.equal(layer.key_store, KEYS) and float(layer.stat_count.sum()) == 0.0
    layer.set_progress(2, 100)
    layer(x)
    assert float(layer.stat_tokens) == 5.0


def test_dormant_keys_reseeded_toward_sampled_queries():
    """decay_target=sample: each dormant key moves toward a query drawn from the step's tokens.

    With one token per micro-batch every draw is that token's query, so the target is known:
    after two micro-batches with queries a and b it is (a + b) / 2 for every dormant expert.
    """
    layer = tiny_layer(decay=True, delta=0.5, theta=1.5, decay_target="sample", usage_ema=False)
    a, b = torch.tensor([[0.0, 2.0, 0.0]]), torch.tensor([[0.0, 0.0, 4.0]])
    layer._accumulate(a, a, torch.tensor([[0, 3]]), torch.tensor([[0.5, 0.5]]))
    layer._accumulate(b, b, torch.tensor([[0, 3]]), torch.tensor([[0.5, 0.5]]))
    assert layer.stat_sample_draws.item() == 2.0
    assert torch.allclose(layer.stat_q_samples, (a + b).expand(4, 3))
    layer.self_organize(0, 100)
    # usage (no EMA) = routed share 2/4 for experts 0 and 3; slots per step 4 -> 2 >= theta 1.5: awake.
    # Experts 1 and 2 routed nothing: dormant, k <- 0.5 k + 0.5 (0, 1, 2)
    target = torch.tensor([0.0, 1.0, 2.0])
    expected = KEYS.clone()
    expected[1] = 0.5 * KEYS[1] + 0.5 * target
    expected[2] = 0.5 * KEYS[2] + 0.5 * target
    assert torch.allclose(layer.key_store, expected, atol=1e-6)
