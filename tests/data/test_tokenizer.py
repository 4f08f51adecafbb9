"""Byte-level BPE: fixed special ids, lossless round trips, byte accounting, stable fingerprints."""

from __future__ import annotations

import numpy as np
import pytest

from somoe.config import ConfigError
from helpers import shipped_stories
from somoe.data import BPETokenizer

UNSEEN = [
    "“Hello,” said Zoë. “Let’s go to the café!”",
    "Naïve émigrés ate crème brûlée — 🙂🐶🎈 and 日本語 too.",
    "Tabs\tand  double  spaces\nand a new line, then [EOS] and [PAD] as plain text.",
    "x",
]


@pytest.fixture(scope="module")
def tok() -> BPETokenizer:
    return BPETokenizer.train(shipped_stories(300) + UNSEEN[:1], vocab_size=400)


def test_special_ids_and_size(tok):
    assert (tok.unk_id, tok.pad_id, tok.eos_id) == (0, 1, 2)
    assert tok.vocab_size == 400  # 300 stories have far more than 141 merges to offer


@pytest.mark.parametrize("text", UNSEEN + shipped_stories(5, start=2000))
def test_round_trip_and_byte_count(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert int(tok.token_byte_lengths()[ids].sum()) == len(text.encode("utf-8"))


def test_special_token_text_is_encoded_as_text(tok):
    ids = tok.encode("a [EOS] b")
    assert tok.eos_id not in ids and tok.pad_id not in ids
    assert tok.decode(ids) == "a [EOS] b"


def test_token_byte_lengths_values(tok):
    lengths = tok.token_byte_lengths()
    assert lengths.dtype == np.int64 and lengths.shape == (400,)
    assert lengths[:3].tolist() == [0, 0, 1]  # UNK, PAD count nothing; EOS stands for one story break
    assert lengths[tok.encode("é")].sum() == 2 and lengths[tok.encode("🙂")].sum() == 4
    assert lengths[3:].min() >= 1  # every real token covers at least one byte
    # each whole-character token decodes to exactly its byte count (partial UTF-8 tokens decode to U+FFFD)
    checked = 0
    for i in range(3, tok.vocab_size):
        text = tok.decode([i])
        if "\ufffd" not in text:
            assert len(text.encode("utf-8")) == lengths[i], (i, text)
            checked += 1
    assert checked >= 250 and lengths.max() >= 5  # all but the 128 lone high bytes; merges are multi-byte


def test_decode_skips_specials(tok):
    assert tok.decode([2, *tok.encode("Hi there."), 2, 1, 1]) == "Hi there."


def test_encode_batch_matches_encode(tok):
    texts = UNSEEN + shipped_stories(3, start=1000)
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


def test_save_load_keeps_ids_and_fingerprint(tok, tmp_path):
    path = tok.save(tmp_path)
    assert path == tmp_path / "tokenizer.json" and path.is_file()
    loaded = BPETokenizer.load(path)
    assert loaded.fingerprint == tok.fingerprint and len(tok.fingerprint) == 16
    assert loaded.encode(UNSEEN[1]) == tok.encode(UNSEEN[1])
    assert loaded.encode("[EOS]") == tok.encode("[EOS]")  # text-mode specials survive the reload
    other = BPETokenizer.train(shipped_stories(300, start=300), vocab_size=400)
    assert other.fingerprint != tok.fingerprint


def test_training_is_deterministic():
    stories = shipped_stories(100, start=600)
    assert BPETokenizer.train(stories, 300).fingerprint == BPETokenizer.train(stories, 300).fingerprint


def test_errors(tmp_path):
    with pytest.raises(ConfigError, match="vocab_size=200"):
        BPETokenizer.train(["abc"], 200)
    with pytest.raises(ConfigError, match="not found"):
        BPETokenizer.load(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ConfigError, match="delete it"):
        BPETokenizer.load(tmp_path / "bad.json")
