"""Token streams on disk (exact layout, validation, atomic writes) and prepare_data's caching."""

from __future__ import annotations

import json

import numpy as np
import pytest

from somoe.config import ConfigError, RunConfig
from helpers import shipped_stories
from somoe.data import BPETokenizer, TokenStream, build_token_stream, prepare_data
from somoe.data import cache as cache_mod
from somoe.data.prepare import cache_root, encode_stories_for_eval


class CharTokenizer:
    """One id per letter ('a' -> 3, 'b' -> 4, ...): exact expected layouts by hand."""

    eos_id, fingerprint = 2, "char-stub"

    def __init__(self, vocab_size: int = 30):
        self.vocab_size = vocab_size

    def encode_batch(self, texts):
        return [[ord(c) - ord("a") + 3 for c in t] for t in texts]


def test_exact_layout_and_meta(tmp_path):
    stream = build_token_stream(["ab", "c", "dde"], CharTokenizer(), tmp_path / "s", source="hand")
    assert np.asarray(stream.tokens).tolist() == [2, 3, 4, 2, 5, 2, 6, 6, 7, 2]
    assert stream.tokens.dtype == np.uint16 and isinstance(stream.tokens, np.memmap)
    assert stream.offsets.tolist() == [1, 4, 6] and stream.offsets.dtype == np.int64
    assert stream.story_lengths.tolist() == [2, 1, 3]
    assert stream.story(2).tolist() == [6, 6, 7]
    assert (len(stream), stream.n_stories, stream.n_bytes) == (10, 3, 6)
    meta = json.loads((tmp_path / "s" / "meta.json").read_text())
    assert {k: meta[k] for k in ("n_stories", "n_tokens", "n_bytes", "dtype", "tokenizer", "source")} == {
        "n_stories": 3, "n_tokens": 10, "n_bytes": 6, "dtype": "uint16", "tokenizer": "char-stub", "source": "hand"}
    assert meta["format_version"] == cache_mod.FORMAT_VERSION
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]  # no temp folder left behind


def test_big_vocab_uses_uint32(tmp_path):
    stream = build_token_stream(["ab"], CharTokenizer(vocab_size=70_000), tmp_path / "s")
    assert stream.tokens.dtype == np.uint32 and np.asarray(stream.tokens).tolist() == [2, 3, 4, 2]
    assert (tmp_path / "s" / "tokens.bin").stat().st_size == 4 * 4


def test_chunking_does_not_change_the_stream(tmp_path, monkeypatch):
    stories = ["ab", "c", "dde", "f", "gh"]
    whole = np.asarray(build_token_stream(stories, CharTokenizer(), tmp_path / "a").tokens)
    monkeypatch.setattr(cache_mod, "CHUNK_STORIES", 2)
    chunked = build_token_stream(stories, CharTokenizer(), tmp_path / "b")
    assert np.array_equal(np.asarray(chunked.tokens), whole)
    assert chunked.offsets.tolist() == [1, 4, 6, 10, 12]


def test_real_tokenizer_round_trip_and_bytes(tmp_path):
    stories = shipped_stories(60, start=100) + ["“Café” 🙂 — fin."]
    tok = BPETokenizer.train(stories, 320)
    stream = build_token_stream(stories, tok, tmp_path / "s")
    reopened = TokenStream.open(tmp_path / "s")
    assert [tok.decode(reopened.story(i)) for i in range(reopened.n_stories)] == stories
    # every target of the stream (all but the leading EOS) in bytes: the stories plus one per EOS
    targets = np.asarray(stream.tokens[1:])
    assert tok.token_byte_lengths()[targets].sum() == stream.n_bytes + stream.n_stories
    assert stream.n_bytes == sum(len(s.encode("utf-8")) for s in stories)
    in_memory = encode_stories_for_eval(stories, tok)
    assert isinstance(in_memory.tokens, np.ndarray) and not isinstance(in_memory.tokens, np.memmap)
    assert np.array_equal(in_memory.tokens, np.asarray(stream.tokens))
    assert np.array_equal(in_memory.offsets, stream.offsets) and in_memory.n_bytes == stream.n_bytes


def test_open_rejects_truncated_or_corrupt_caches(tmp_path):
    folder = tmp_path / "s"
    build_token_stream(["ab", "c"], CharTokenizer(), folder)
    with open(folder / "tokens.bin", "r+b") as fh:
        fh.truncate(6)
    with pytest.raises(ConfigError, match="truncated or corrupt .*delete the cache folder"):
        TokenStream.open(folder)
    (folder / "meta.json").write_text("{", encoding="utf-8")
    with pytest.raises(ConfigError, match="corrupt meta.json"):
        TokenStream.open(folder)


def test_a_finished_concurrent_build_is_kept(tmp_path):
    first = build_token_stream(["ab"], CharTokenizer(), tmp_path / "s")
    again = build_token_stream(["zz"], CharTokenizer(), tmp_path / "s")  # the folder already exists
    assert np.asarray(again.tokens).tolist() == np.asarray(first.tokens).tolist() == [2, 3, 4, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


# --- prepare_data -------------------------------------------------------------------------------
def tiny_cfg(cache_dir, **data) -> RunConfig:
    cfg = RunConfig()
    cfg.model.vocab_size = 320
    cfg.data.cache_dir = str(cache_dir)
    cfg.data.builtin_train_stories, cfg.data.builtin_val_stories = 120, 12
    cfg.data.tokenizer_train_stories = 120
    for k, v in data.items():
        setattr(cfg.data, k, v)
    return cfg


def test_prepare_builds_then_reuses(tmp_path):
    logs: list[str] = []
    cfg = tiny_cfg(tmp_path / "cache")
    data = prepare_data(cfg, tmp_path / "run", log=logs.append)
    assert data.tokenizer.vocab_size == 320
    assert (data.train.n_stories, data.val.n_stories) == (120, 12)
    assert data.train.n_bytes == sum(len(s.encode()) for s in shipped_stories(120))
    assert data.tokenizer_path == tmp_path / "run" / "tokenizer.json"
    assert BPETokenizer.load(data.tokenizer_path).fingerprint == data.tokenizer.fingerprint
    assert not any("using cached" in m for m in logs)

    logs.clear()
    again = prepare_data(tiny_cfg(tmp_path / "cache"), None, log=logs.append)
    assert sum("using cached" in m for m in logs) == 3  # tokenizer, train, val
    assert again.tokenizer.fingerprint == data.tokenizer.fingerprint
    assert np.array_equal(np.asarray(again.train.tokens), np.asarray(data.train.tokens))
    assert again.train.folder == data.train.folder != data.val.folder

    # seq_len and mode are cut at batch time: they reuse the same cache folders
    third = prepare_data(tiny_cfg(tmp_path / "cache", seq_len=16, mode="padded"), None, log=lambda *_: None)
    assert third.train.folder == data.train.folder


def test_prepare_prefers_explicit_then_run_tokenizer(tmp_path):
    cache = tmp_path / "cache"
    other = BPETokenizer.train(shipped_stories(50, start=900), 300)
    path = other.save(tmp_path / "mine")
    data = prepare_data(tiny_cfg(cache, tokenizer_path=str(path)), tmp_path / "run", log=lambda *_: None)
    assert data.tokenizer.fingerprint == other.fingerprint and data.tokenizer.vocab_size == 300
    assert BPETokenizer.load(tmp_path / "run" / "tokenizer.json").fingerprint == other.fingerprint
    # a resumed run keeps the tokenizer already in its folder
    resumed = prepare_data(tiny_cfg(cache), tmp_path / "run", log=lambda *_: None)
    assert resumed.tokenizer.fingerprint == other.fingerprint


def test_prepare_rejects_a_tokenizer_bigger_than_the_model(tmp_path):
    path = BPETokenizer.train(shipped_stories(50, start=900), 300).save(tmp_path / "t")
    cfg = tiny_cfg(tmp_path / "cache", tokenizer_path=str(path))
    cfg.model.vocab_size = 280
    with pytest.raises(ConfigError, match="model.vocab_size=300"):
        prepare_data(cfg, None, log=lambda *_: None)


def test_cache_root_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv("SOMOE_CACHE", str(tmp_path / "env"))
    assert cache_root(tiny_cfg(tmp_path / "explicit").data) == tmp_path / "explicit"
    assert cache_root(tiny_cfg("").data) == tmp_path / "env"
    monkeypatch.delenv("SOMOE_CACHE")
    assert str(cache_root(tiny_cfg("").data)).endswith(".cache/somoe")
