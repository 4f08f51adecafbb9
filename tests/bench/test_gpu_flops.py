"""``somoe bench gpu``'s MFU numerator and denominator, by hand: 6 FLOPs per trained weight, 4 per frozen
SoME expert weight (no weight gradient), the k of E routed experts only; the datasheet peak by chip and
form factor."""

from __future__ import annotations

import pytest
import torch

from somoe.bench.gpu import datasheet_peak, step_flops
from somoe.config import load_config
from somoe.models.transformer import build_model

B, S, L, D, V = 2, 16, 2, 32, 64
TINY = (f"model.d_model={D}", f"model.n_layers={L}", "model.n_heads=2", f"model.vocab_size={V}",
        f"model.max_seq_len={S}", f"data.seq_len={S}", f"train.batch_size={B}", "model.d_ffn=64")


def _trainable_without_positions(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "pos_emb" not in n)


def test_some_counts_its_k_frozen_experts_at_4_flops_per_weight():
    """E=8, k=2, d_ffn=16, biases: a token touches 2 experts of 2*32*16 + 16 + 32 = 1,072 frozen weights in each
    of 2 layers, 4 FLOPs each; every trainable weight (query net, keys' temperature, attention, embeddings)
    at 6; attention products 12 * L * d * S per token."""
    cfg = load_config(preset="seed000_some", overrides=[*TINY, "model.some.num_experts=8", "model.some.top_k=2",
                                                        "model.some.d_ffn=16", "model.some.expert_bias=true",
                                                        "model.some.entropy_band=[0.3,0.6]"])
    model = build_model(cfg.model, torch.device("cpu"))
    frozen = L * 2 * (2 * D * 16 + 16 + D)
    expected = (6 * _trainable_without_positions(model) + 4 * frozen) * B * S + 12 * L * D * S * B * S
    assert step_flops(model, cfg, B, S) == expected
    assert frozen == 4288  # by hand, so a wrong expert count cannot cancel out


def test_moe_counts_its_k_trainable_experts_at_6_flops_per_weight():
    """E=4, k=2, d_ffn=16 (GELU with biases): of each layer's 4 * 1,072 expert weights a token uses 2 * 1,072."""
    cfg = load_config(preset="cpu_moe", overrides=[*TINY, "model.moe.num_experts=4", "model.moe.top_k=2",
                                                   "model.moe.d_ffn=16"])
    model = build_model(cfg.model, torch.device("cpu"))
    idle = L * (4 - 2) * (2 * D * 16 + 16 + D)
    expected = 6 * (_trainable_without_positions(model) - idle) * B * S + 12 * L * D * S * B * S
    assert step_flops(model, cfg, B, S) == expected


@pytest.mark.parametrize("name, peak, label", [
    ("NVIDIA H100 80GB HBM3", 989e12, "H100 SXM"), ("NVIDIA H100 PCIe", 756e12, "H100 PCIe"),
    ("NVIDIA H100 NVL", 835e12, "H100 NVL"), ("NVIDIA H200", 989e12, "H200 SXM"), ("NVIDIA H200 NVL", 835e12, "H200 NVL"),
    ("NVIDIA A100-SXM4-80GB", 312e12, "A100 SXM"), ("NVIDIA A100 80GB PCIe", 312e12, "A100 PCIe")])
def test_datasheet_peak_follows_the_form_factor(name, peak, label):
    assert datasheet_peak(name) == (peak, f"datasheet {label}")


def test_unknown_gpus_have_no_datasheet_peak():
    assert datasheet_peak("NVIDIA GeForce RTX 4090") is None  # the bench measures a matmul ceiling instead
