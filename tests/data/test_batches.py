"""Training batches (packed / padded) and evaluation windows on a hand-made stream."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from somoe.config import ConfigError
from somoe.data import TrainBatches, count_eval_targets, eval_batches
from somoe.data.cache import TokenStream

EOS, PAD, IGN = 2, 1, -100
# three stories of 3, 2 and 5 tokens in the cache layout EOS s1 EOS s2 EOS s3 EOS
TOKENS = [EOS, 10, 11, 12, EOS, 20, 21, EOS, 30, 31, 32, 33, 34, EOS]
OFFSETS = [1, 5, 8]


def hand_stream() -> TokenStream:
    meta = {"n_stories": 3, "n_bytes": 10, "n_tokens": len(TOKENS)}
    return TokenStream(np.array(TOKENS, dtype=np.uint16), np.array(OFFSETS, dtype=np.int64), meta)


def batches(mode, seq_len, seed=0) -> TrainBatches:
    return TrainBatches(hand_stream(), mode, seq_len, seed, pad_id=PAD, eos_id=EOS)


# --- packed -------------------------------------------------------------------------------------
def test_packed_windows_are_shifted_stream_slices():
    b = batches("packed", 4, seed=3)
    x, y = b.batch(step=5, global_batch=6, start=0, count=6)
    assert x.dtype == y.dtype == torch.long and x.shape == y.shape == (6, 4)
    starts = np.random.default_rng([3, 5]).integers(0, len(TOKENS) - 4, size=6)  # documented recipe
    for row, s in enumerate(starts):
        assert x[row].tolist() == TOKENS[s:s + 4]
        assert y[row].tolist() == TOKENS[s + 1:s + 5]


def test_packed_window_can_reach_the_last_token():
    b = batches("packed", 13)  # exactly one possible window: the whole stream
    x, y = b.batch(0, 2, 0, 2)
    assert x.tolist() == [TOKENS[:-1]] * 2 and y.tolist() == [TOKENS[1:]] * 2


@pytest.mark.parametrize("mode", ["packed", "padded"])
def test_global_batch_is_a_pure_function_of_seed_and_step(mode):
    b1, b2 = batches(mode, 4, seed=1), batches(mode, 4, seed=1)
    for step in (0, 1, 7):
        whole = b1.batch(step, 8, 0, 8)
        halves = [b2.batch(step, 8, 0, 4), b2.batch(step, 8, 4, 4)]
        quarters = [b2.batch(step, 8, s, 2) for s in (0, 2, 4, 6)]
        for parts in (halves, quarters):
            assert torch.equal(torch.cat([p[0] for p in parts]), whole[0])
            assert torch.equal(torch.cat([p[1] for p in parts]), whole[1])
    assert not torch.equal(b1.batch(0, 8, 0, 8)[0], batches(mode, 4, seed=2).batch(0, 8, 0, 8)[0])


def test_packed_steps_differ_and_short_streams_fail():
    b = batches("packed", 4)
    assert not torch.equal(b.batch(0, 8, 0, 8)[0], b.batch(1, 8, 0, 8)[0])
    with pytest.raises(ConfigError, match="seq_len"):
        batches("packed", 14)


# --- padded -------------------------------------------------------------------------------------
# [EOS] story [EOS] cut to seq_len + 1 = 7, right-padded; x = row[:-1], y = row[1:] with PAD -> -100
PADDED_6 = {
    0: ([EOS, 10, 11, 12, EOS, PAD], [10, 11, 12, EOS, IGN, IGN]),
    1: ([EOS, 20, 21, EOS, PAD, PAD], [20, 21, EOS, IGN, IGN, IGN]),
    2: ([EOS, 30, 31, 32, 33, 34], [30, 31, 32, 33, 34, EOS]),
}
PADDED_4 = {  # story 2 truncated: [EOS 30 31 32 33], its end is cut off
    0: ([EOS, 10, 11, 12], [10, 11, 12, EOS]),
    1: ([EOS, 20, 21, EOS], [20, 21, EOS, IGN]),
    2: ([EOS, 30, 31, 32], [30, 31, 32, 33]),
}


@pytest.mark.parametrize("seq_len,expected", [(6, PADDED_6), (4, PADDED_4)])
def test_padded_rows_exact(seq_len, expected):
    b = batches("padded", seq_len, seed=4)
    x, y = b.batch(0, 3, 0, 3)
    order = np.random.default_rng([4, 0]).permutation(3)  # epoch 0's order
    assert x.tolist() == [expected[int(i)][0] for i in order]
    assert y.tolist() == [expected[int(i)][1] for i in order]


def test_padded_visits_every_story_once_per_epoch():
    b = batches("padded", 6, seed=9)
    first_token = {10: 0, 20: 1, 30: 2}
    seen = [first_token[int(b.batch(step, 1, 0, 1)[0][0, 1])] for step in range(9)]
    for epoch in range(3):
        assert sorted(seen[3 * epoch:3 * epoch + 3]) == [0, 1, 2]
        assert seen[3 * epoch:3 * epoch + 3] == np.random.default_rng([9, epoch]).permutation(3).tolist()
    # global batch 2: step 1 holds samples 2 and 3, straddling epochs 0 and 1
    x, _ = b.batch(1, 2, 0, 2)
    assert [first_token[int(t)] for t in x[:, 1]] == [seen[2], seen[3]]


def test_steps_per_epoch():
    assert batches("packed", 4).steps_per_epoch(2) == 1  # 14 // (2*4)
    assert batches("packed", 2).steps_per_epoch(1) == 7
    assert batches("packed", 4).steps_per_epoch(64) == 1  # at least one
    assert batches("padded", 4).steps_per_epoch(2) == 2  # ceil(3 / 2)
    assert batches("padded", 4).steps_per_epoch(3) == 1


# --- eval ------------------------------------------------------------------------------------------
def test_eval_windows_exact():
    out = list(eval_batches(hand_stream(), 4, batch_size=3))
    assert [tuple(x.shape) for x, _ in out] == [(3, 4), (1, 4)]
    x = torch.cat([b[0] for b in out]).tolist()
    y = torch.cat([b[1] for b in out]).tolist()
    assert x == [TOKENS[0:4], TOKENS[4:8], TOKENS[8:12], [TOKENS[12], PAD, PAD, PAD]]
    assert y == [TOKENS[1:5], TOKENS[5:9], TOKENS[9:13], [TOKENS[13], IGN, IGN, IGN]]
    assert out[0][0].dtype == out[0][1].dtype == torch.long


@pytest.mark.parametrize("seq_len,batch_size", [(1, 1), (3, 2), (4, 3), (13, 1), (20, 5)])
def test_eval_scores_every_target_exactly_once(seq_len, batch_size):
    ys = torch.cat([y.reshape(-1) for _, y in eval_batches(hand_stream(), seq_len, batch_size)])
    assert ys[ys != IGN].tolist() == TOKENS[1:]
    assert count_eval_targets(hand_stream(), seq_len) == len(TOKENS) - 1


def test_eval_max_batches():
    out = list(eval_batches(hand_stream(), 2, batch_size=2, max_batches=2))
    assert len(out) == 2 and torch.cat([b[1] for b in out]).reshape(-1).tolist() == TOKENS[1:9]
    assert count_eval_targets(hand_stream(), 2, batch_size=2, max_batches=2) == 8
    assert count_eval_targets(hand_stream(), 2, batch_size=2, max_batches=100) == 13
