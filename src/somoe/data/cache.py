"""Pretokenized token streams stored on disk (and the same layout in memory).

A split is one flat array ``EOS s1 EOS s2 EOS ... sN EOS``: the leading EOS
gives every story's first token an EOS context, as at generation time, and
every EOS after a story is a target (the model learns where stories end).

A cache folder holds::

    tokens.bin    the flat array, uint16 (vocab <= 65535) or uint32, read as a memmap
    offsets.npy   int64 start index of each story's first token (length N)
    meta.json     n_stories, n_tokens, n_bytes (UTF-8 bytes of all stories), dtype,
                  tokenizer fingerprint, source key, format version
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..config import ConfigError
from .tokenizer import BPETokenizer

FORMAT_VERSION = 1
CHUNK_STORIES = 2048  # stories per encode_batch call: parallel in Rust, bounded memory


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype that holds every id."""
    return np.dtype(np.uint16 if vocab_size <= 65535 else np.uint32)


class TokenStream:
    """A tokenized split: ``tokens`` (memmap or array), ``offsets``, ``n_stories``, ``n_bytes``.

    ``len(stream)`` is the number of tokens. Build one with
    :func:`build_token_stream` (on disk), :func:`encode_in_memory`, or open a
    cache folder with :meth:`open`.
    """

    def __init__(self, tokens: np.ndarray, offsets: np.ndarray, meta: dict[str, Any], folder: Path | None = None):
        self.tokens = tokens
        self.offsets = offsets
        self.meta = meta
        self.folder = folder
        self.n_stories = int(meta["n_stories"])
        self.n_bytes = int(meta["n_bytes"])

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def story_lengths(self) -> np.ndarray:
        """Tokens of each story (EOS separators excluded), int64, length ``n_stories``."""
        ends = np.append(self.offsets[1:] - 1, len(self) - 1)  # each story is followed by one EOS
        return ends - self.offsets

    def story(self, i: int) -> np.ndarray:
        """Token ids of story ``i`` (without EOS)."""
        start = int(self.offsets[i])
        return np.asarray(self.tokens[start:start + int(self.story_lengths[i])])

    @classmethod
    def open(cls, folder: str | Path) -> TokenStream:
        """Open a cache folder written by :func:`build_token_stream`, checking it is complete."""
        folder = Path(folder)
        fix = f"delete the cache folder {folder} and run again to rebuild it"
        try:
            meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
            n_tokens, n_stories, dtype = int(meta["n_tokens"]), int(meta["n_stories"]), np.dtype(meta["dtype"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"token cache {folder} has a missing or corrupt meta.json ({e}); {fix}") from None
        if meta.get("format_version") != FORMAT_VERSION:
            raise ConfigError(f"token cache {folder} has format {meta.get('format_version')}, this somoe "
                              f"reads {FORMAT_VERSION}; {fix}")
        tokens_path = folder / "tokens.bin"
        size = tokens_path.stat().st_size if tokens_path.is_file() else -1
        if size != n_tokens * dtype.itemsize:
            raise ConfigError(f"token cache {tokens_path} is truncated or corrupt ({size} bytes, meta.json "
                              f"says {n_tokens} x {dtype.itemsize}); {fix}")
        try:
            offsets = np.load(folder / "offsets.npy", allow_pickle=False)
        except (OSError, ValueError) as e:
            raise ConfigError(f"token cache {folder} has a missing or corrupt offsets.npy ({e}); {fix}") from None
        if offsets.shape != (n_stories,) or offsets.dtype != np.int64:
            raise ConfigError(f"token cache {folder}: offsets.npy does not match meta.json; {fix}")
        tokens = np.memmap(tokens_path, dtype=dtype, mode="r", shape=(n_tokens,))
        return cls(tokens, offsets, meta, folder)


def _encode_chunks(stories: Sequence[str], tokenizer: BPETokenizer, dtype: np.dtype):
    """Yield (flat tokens 's_i EOS s_i+1 EOS ...', per-story token counts) chunk by chunk."""
    eos = tokenizer.eos_id
    for lo in range(0, len(stories), CHUNK_STORIES):
        encoded = tokenizer.encode_batch(stories[lo:lo + CHUNK_STORIES])
        lengths = np.fromiter((len(ids) for ids in encoded), dtype=np.int64, count=len(encoded))
        ids = np.fromiter(itertools.chain.from_iterable(encoded), dtype=dtype, count=int(lengths.sum()))
        # one EOS after each story: insert before the index where the next story would start
        yield np.insert(ids, np.cumsum(lengths), eos), lengths


def _offsets(lengths: np.ndarray) -> np.ndarray:
    # story i starts after the leading EOS, the previous stories and their EOS separators
    return (1 + np.concatenate([[0], np.cumsum(lengths[:-1] + 1)])).astype(np.int64) if len(lengths) else \
        np.zeros(0, dtype=np.int64)


def _meta(stories: Sequence[str], tokenizer: BPETokenizer, n_tokens: int, dtype: np.dtype,
          source: str) -> dict[str, Any]:
    return {"format_version": FORMAT_VERSION, "n_stories": len(stories), "n_tokens": n_tokens,
            "n_bytes": sum(len(s.encode("utf-8")) for s in stories), "dtype": dtype.name,
            "tokenizer": tokenizer.fingerprint, "vocab_size": tokenizer.vocab_size, "source": source}


def build_token_stream(stories: Sequence[str], tokenizer: BPETokenizer, folder: str | Path,
                       source: str = "") -> TokenStream:
    """Tokenize ``stories`` into the cache folder ``folder`` and open it.

    Written into a temporary sibling folder first and moved into place with
    one ``os.replace``, so an interrupted build never leaves a half-written
    cache that a later run would trust. If another process finished the same
    folder first, its copy is kept and opened.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tokenizer.vocab_size)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        all_lengths = []
        with open(tmp / "tokens.bin", "wb") as fh:
            np.array([tokenizer.eos_id], dtype=dtype).tofile(fh)
            for flat, lengths in _encode_chunks(stories, tokenizer, dtype):
                flat.tofile(fh)
                all_lengths.append(lengths)
        lengths = np.concatenate(all_lengths) if all_lengths else np.zeros(0, dtype=np.int64)
        n_tokens = 1 + int(lengths.sum()) + len(lengths)
        np.save(tmp / "offsets.npy", _offsets(lengths))
        meta = _meta(stories, tokenizer, n_tokens, dtype, source)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
        try:
            os.replace(tmp, folder)
        except OSError:
            if not (folder / "meta.json").is_file():  # not a finished concurrent build: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return TokenStream.open(folder)


def encode_in_memory(stories: Sequence[str], tokenizer: BPETokenizer, source: str = "") -> TokenStream:
    """The same layout as :func:`build_token_stream`, held in RAM (``tokens`` is an ndarray)."""
    dtype = token_dtype(tokenizer.vocab_size)
    parts, all_lengths = [np.array([tokenizer.eos_id], dtype=dtype)], []
    for flat, lengths in _encode_chunks(stories, tokenizer, dtype):
        parts.append(flat)
        all_lengths.append(lengths)
    lengths = np.concatenate(all_lengths) if all_lengths else np.zeros(0, dtype=np.int64)
    tokens = np.concatenate(parts)
    return TokenStream(tokens, _offsets(lengths), _meta(stories, tokenizer, len(tokens), dtype, source))
