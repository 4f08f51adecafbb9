"""PAD positions stay out of routing statistics: a padded batch gathers exactly what its real tokens
gather unpadded (key-rule accumulators, usage tallies and readouts, aux loss), SoME and MoE alike."""

from __future__ import annotations

import pytest
import torch

from somoe.config import ModelConfig
from somoe.models import IGNORE_INDEX, build_model
from somoe.models.ffn.some import statistic_shapes

VOCAB, PAD = 40, 1


def tiny_lm(ffn: str, backbone: str = "gpt2"):
    some = {"num_experts": 6, "top_k": 2, "d_ffn": 8, "aux_loss_coef": 0.1, "center_queries": True,
            "decay_target": "sample", "peer": True, "gamma": 0.1}
    moe = {"num_experts": 6, "top_k": 2, "d_ffn": 8, "noisy_gating": False, "aux_loss_coef": 0.1,
           "capacity_factor": 0.0}  # a capacity counts PAD slots too (sized by T): see moe.forward
    cfg = ModelConfig(backbone=backbone, positions="rope" if backbone == "smollm" else "learned", vocab_size=VOCAB,
                      d_model=16, n_layers=2, n_heads=2, max_seq_len=32, ffn=ffn,
                      activation="swiglu" if backbone == "smollm" else "gelu")
    for key, value in (some if ffn == "some" else moe).items():
        setattr(getattr(cfg, ffn), key, value)
    cfg.validate()
    torch.manual_seed(0)
    return build_model(cfg).train()


def layer_state(model) -> list[dict[str, torch.Tensor | float]]:
    out = []
    for ffn in model.ffns():
        state = {k: float(v) for k, v in ffn.readouts().items() if not k.startswith("key_")}
        if hasattr(ffn, "som_statistics"):
            state.update({name: ffn.get_buffer(name).clone() for name in statistic_shapes(ffn.cfg, 16)})
        out.append(state)
    return out


def assert_same(a: list[dict], b: list[dict]) -> None:
    for la, lb in zip(a, b):
        assert la.keys() == lb.keys()
        for key in la:
            got, want = torch.as_tensor(la[key]).double(), torch.as_tensor(lb[key]).double()
            assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (key, got, want)


def run(model, rows: list[tuple[torch.Tensor, torch.Tensor]]):
    """Forwards (one per (ids, targets) row batch), returning the summed aux loss and the layers' state."""
    model.reset_readouts()
    for ffn in model.ffns():
        if hasattr(ffn, "_clear_statistics"):
            ffn._clear_statistics()
    aux = 0.0
    for ids, targets in rows:
        aux = aux + model(ids, targets).aux_loss
    return aux, layer_state(model)


@pytest.mark.parametrize("ffn,backbone", [("some", "gpt2"), ("some", "smollm"), ("moe", "gpt2")])
def test_a_padded_batch_gathers_what_its_real_tokens_gather_unpadded(ffn, backbone):
    model = tiny_lm(ffn, backbone)
    g = torch.Generator().manual_seed(3)
    real = torch.randint(3, VOCAB, (1, 11), generator=g)
    targets = torch.randint(3, VOCAB, (1, 11), generator=g)
    padded = torch.cat([real, torch.full((1, 7), PAD)], 1)
    padded_targets = torch.cat([targets, torch.full((1, 7), IGNORE_INDEX)], 1)
    aux_real, real_state = run(model, [(real, targets)])
    aux_pad, pad_state = run(model, [(padded, padded_targets)])
    assert torch.allclose(aux_pad, aux_real, atol=1e-6)
    assert_same(pad_state, real_state)
    # the statistics saw 11 tokens, not 18
    counted = pad_state[0]["stat_tokens"] if ffn == "some" else None
    assert counted is None or float(counted) == 11.0


def test_two_rows_of_different_lengths_equal_the_rows_alone():
    """Right-padded rows of a batch: the statistics sum what each row gathers unpadded (the sample
    draw, one per forward, left out)."""
    model = tiny_lm("some")
    g = torch.Generator().manual_seed(4)
    a, b = torch.randint(3, VOCAB, (1, 9), generator=g), torch.randint(3, VOCAB, (1, 14), generator=g)
    ta, tb = torch.randint(3, VOCAB, (1, 9), generator=g), torch.randint(3, VOCAB, (1, 14), generator=g)
    batch = torch.cat([torch.cat([a, torch.full((1, 5), PAD)], 1), b])
    batch_targets = torch.cat([torch.cat([ta, torch.full((1, 5), IGNORE_INDEX)], 1), tb])
    _, alone = run(model, [(a, ta), (b, tb)])
    _, together = run(model, [(batch, batch_targets)])
    for state in alone + together:
        for key in ("stat_q_samples", "stat_sample_draws", "gate_entropy_nats"):
            state.pop(key, None)  # per-forward draws; the entropy mean is checked through its sum below
    assert_same(together, alone)
