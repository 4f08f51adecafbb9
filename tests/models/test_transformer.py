"""The LM: causal masking, KV-cache decoding, the loss, weight tying, config checks."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from somoe.config import ConfigError, ModelConfig, from_dict
from somoe.models import IGNORE_INDEX, build_model
from somoe.models.layers import KVCache

VOCAB = 50

# (backbone, positions) pairs the schema allows; smollm always uses RoPE + SwiGLU
BACKBONES = [("gpt2", "learned"), ("gpt2", "sinusoidal"), ("gpt2", "rope"), ("gpt2", "none"), ("smollm", "rope")]


def tiny_model(backbone="gpt2", positions="learned", tie=True, **extra):
    cfg = ModelConfig(backbone=backbone, positions=positions, vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4,
                      max_seq_len=32, tie_embeddings=tie, init_std=0.1,
                      activation="swiglu" if backbone == "smollm" else "gelu", **extra)
    cfg.validate()
    torch.manual_seed(0)
    return build_model(cfg).eval()


def random_ids(B, T, seed=1):
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("backbone,positions", BACKBONES)
def test_future_tokens_never_change_earlier_logits(backbone, positions):
    model = tiny_model(backbone, positions)
    idx_BT = random_ids(2, 16)
    changed_BT = idx_BT.clone()
    j = 9
    changed_BT[:, j] = (idx_BT[:, j] + 1) % VOCAB
    with torch.no_grad():
        a_BTV, b_BTV = model(idx_BT).logits, model(changed_BT).logits
    assert (a_BTV[:, :j] - b_BTV[:, :j]).abs().max().item() < 1e-6
    # the perturbation is real: the changed position itself sees it
    assert (a_BTV[:, j] - b_BTV[:, j]).abs().max().item() > 1e-3


def incremental_logits(model, idx_BT, prefill):
    """Prefill ``prefill`` tokens with a KV cache, then feed the rest one at a time."""
    B, T = idx_BT.shape
    cfg = model.cfg
    cache = KVCache(cfg.n_layers, B, cfg.n_heads, T, cfg.head_dim, idx_BT.device, torch.float32)
    chunks = [idx_BT[:, :prefill]] + [idx_BT[:, t:t + 1] for t in range(prefill, T)]
    out = []
    for chunk_BT in chunks:
        cache.append_valid(torch.ones_like(chunk_BT, dtype=torch.bool))
        out.append(model(chunk_BT, cache=cache).logits)
    assert cache.length == T
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("backbone,positions", BACKBONES)
def test_kv_cache_decoding_matches_full_forward(backbone, positions, tie):
    model = tiny_model(backbone, positions, tie=tie)
    idx_BT = random_ids(2, 20)
    with torch.no_grad():
        full_BTV = model(idx_BT).logits
        inc_BTV = incremental_logits(model, idx_BT, prefill=7)
    assert inc_BTV.shape == full_BTV.shape
    assert (inc_BTV - full_BTV).abs().max().item() < 1e-5


def test_cached_forward_refuses_to_run_past_max_seq_len():
    model = tiny_model()
    cache = KVCache(2, 1, 4, 40, 8, torch.device("cpu"), torch.float32)
    cache.length = 31
    with pytest.raises(ValueError, match="max_seq_len"):
        model(random_ids(1, 2), cache=cache)


@pytest.mark.parametrize("backbone,positions", [b for b in BACKBONES if b[1] != "learned"])
def test_extended_context_equals_a_model_built_for_the_longer_context(backbone, positions):
    model = tiny_model(backbone, positions)
    longer = build_model(replace(model.cfg, max_seq_len=64)).eval()
    longer.load_state_dict(model.state_dict())
    idx_BT = random_ids(2, 64)
    with torch.no_grad():
        short_BTV = model(idx_BT[:, :32]).logits
        model.extend_context(64)
        extended_BTV, reference_BTV = model(idx_BT).logits, longer(idx_BT).logits
    assert model.cfg.max_seq_len == 64
    assert (extended_BTV - reference_BTV).abs().max().item() < 1e-6
    assert (extended_BTV[:, :32] - short_BTV).abs().max().item() < 1e-5  # causal: the first 32 are unchanged


def test_learned_positions_refuse_a_longer_context():
    model = tiny_model(positions="learned")
    model.extend_context(16)  # shorter: nothing to do
    with pytest.raises(ValueError, match="max_seq_len=32"):
        model.extend_context(33)


def test_loss_ignores_padding_targets():
    model = tiny_model()
    idx_BT = random_ids(2, 10)
    targets_BT = random_ids(2, 10, seed=2)
    targets_BT[0, 6:] = IGNORE_INDEX
    targets_BT[1, :3] = IGNORE_INDEX
    with torch.no_grad():
        out = model(idx_BT, targets_BT)
    # hand cross-entropy over the 6 + 7 counted positions only
    logp_BTV = out.logits.double().log_softmax(-1)
    counted = [(b, t) for b in range(2) for t in range(10) if targets_BT[b, t] != IGNORE_INDEX]
    assert len(counted) == 13
    hand = -sum(logp_BTV[b, t, targets_BT[b, t]] for b, t in counted) / len(counted)
    assert abs(out.ce_loss.item() - hand.item()) < 1e-5
    assert abs(out.loss.item() - hand.item()) < 1e-5  # dense FFN: no aux loss
    # counting the ignored positions (as if their targets were token 0) would give another number
    everything = F.cross_entropy(out.logits.view(-1, VOCAB), targets_BT.clamp(min=0).view(-1))
    assert abs(everything.item() - hand.item()) > 1e-3


def test_tied_head_shares_storage_with_the_embedding():
    tied, untied = tiny_model(tie=True), tiny_model(tie=False)
    assert tied.head.weight.data_ptr() == tied.tok_emb.weight.data_ptr()
    with torch.no_grad():
        tied.tok_emb.weight[3, 0] = 7.0
    assert tied.head.weight[3, 0].item() == 7.0
    assert untied.head.weight.data_ptr() != untied.tok_emb.weight.data_ptr()
    # a tied head is counted once
    assert tied.param_counts()["total"] == untied.param_counts()["total"] - VOCAB * 32


def test_heads_must_divide_d_model():
    with pytest.raises(ConfigError, match="not divisible"):
        from_dict(ModelConfig, {"d_model": 30, "n_heads": 4})
    assert from_dict(ModelConfig, {"d_model": 32, "n_heads": 4}).head_dim == 8
