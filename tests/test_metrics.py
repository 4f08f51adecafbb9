"""Bits per byte and loss on cases computed by hand."""

import math

import numpy as np
import torch

from somoe.config import ModelConfig
from somoe.metrics import evaluate, summarize
from somoe.models import IGNORE_INDEX, build_model


def uniform_model(vocab):
    """Zero output head: every next-token distribution is uniform, NLL = ln(vocab) per token."""
    model = build_model(ModelConfig(vocab_size=vocab, d_model=16, n_layers=1, n_heads=2, max_seq_len=8))
    torch.nn.init.zeros_(model.head.weight)  # tied: the embedding is zero too, still uniform logits
    return model


def test_bpb_by_hand_on_a_uniform_model():
    vocab = 10
    model = uniform_model(vocab)
    # two windows: targets 3,4,2 | 5,IGNORE ; token byte lengths: id3 -> 2 bytes, id4 -> 1, id5 -> 3, EOS(2) -> 1
    x = torch.tensor([[2, 3, 4], [2, 5, 0]])
    y = torch.tensor([[3, 4, 2], [5, IGNORE_INDEX, IGNORE_INDEX]])
    token_bytes = np.zeros(vocab, dtype=np.int64)
    token_bytes[[2, 3, 4, 5]] = [1, 2, 1, 3]
    result = evaluate(model, [(x, y)], token_bytes, torch.device("cpu"))
    assert result.tokens == 4
    assert result.bytes == 2 + 1 + 1 + 3
    nll = 4 * math.log(vocab)
    assert math.isclose(result.loss, math.log(vocab), rel_tol=1e-6)
    assert math.isclose(result.ppl, vocab, rel_tol=1e-5)
    assert math.isclose(result.bpb, nll / math.log(2) / 7, rel_tol=1e-6)


def test_summarize_units():
    loss, ppl, bpb = summarize(nll_nats=10 * math.log(2), tokens=5, n_bytes=20)
    assert math.isclose(loss, 2 * math.log(2))
    assert math.isclose(ppl, 4.0)
    assert math.isclose(bpb, 0.5)


def test_windows_are_sharded_across_ranks_without_overlap():
    model = uniform_model(10)
    batches = [(torch.tensor([[2, 3]]), torch.tensor([[3, 4]])) for _ in range(5)]
    token_bytes = np.ones(10, dtype=np.int64)
    rank0 = evaluate(model, batches, token_bytes, torch.device("cpu"), rank=0, world_size=2)
    rank1 = evaluate(model, batches, token_bytes, torch.device("cpu"), rank=1, world_size=2)
    assert (rank0.tokens, rank1.tokens) == (6, 4)  # windows 0,2,4 and 1,3 (no process group: no sum)
