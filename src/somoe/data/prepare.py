"""``prepare_data``: the tokenizer and the pretokenized train/val streams of a run.

Cache layout (under ``data.cache_dir``, else ``$SOMOE_CACHE``, else ``~/.cache/somoe``)::

    tokenizers/<sha of (train source, vocab, #stories)>.json   trained BPEs, reused across runs
    <sha of (source key, tokenizer fingerprint, split)>/      one TokenStream folder per split

The token cache is keyed by the stories and the tokenizer only: ``seq_len``,
``mode`` and the batch size do not change what is stored, because windows and
padded rows are cut from the stream at batch time (``somoe.data.batches``).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..config import ConfigError, DataConfig, RunConfig
from .cache import TokenStream, build_token_stream, encode_in_memory
from .packaged import ATTRIBUTION
from .sources import load_stories, resolve_source, source_key
from .tokenizer import BPETokenizer

TOKENIZER_RECIPE = 1  # bump when BPETokenizer.train changes, so cached tokenizers are retrained


@dataclass
class PreparedData:
    tokenizer: BPETokenizer
    train: TokenStream | None  # None when only the validation split was asked for
    val: TokenStream
    tokenizer_path: Path


def cache_root(data_cfg: DataConfig) -> Path:
    """``data.cache_dir``, else ``$SOMOE_CACHE``, else ``~/.cache/somoe``."""
    root = data_cfg.cache_dir or os.environ.get("SOMOE_CACHE") or "~/.cache/somoe"
    return Path(root).expanduser()


def _sha(*parts: object) -> str:
    return hashlib.sha256("\x1f".join(map(str, parts)).encode("utf-8")).hexdigest()[:20]


class _TrainStories:
    """Training stories, loaded at most once and only if something needs them (all may be cached)."""

    def __init__(self, data_cfg: DataConfig):
        self.data_cfg, self._stories = data_cfg, None

    def get(self) -> list[str]:
        if self._stories is None:
            self._stories = load_stories(self.data_cfg, "train")
        return self._stories


def _resolve_tokenizer(cfg: RunConfig, run_dir: Path | None, root: Path, train: _TrainStories,
                       log: Callable[..., None]) -> tuple[BPETokenizer, Path]:
    d = cfg.data
    if d.tokenizer_path:
        path = Path(d.tokenizer_path).expanduser()
        return BPETokenizer.load(path), path
    if run_dir is not None and (run_dir / "tokenizer.json").is_file():
        path = run_dir / "tokenizer.json"
        log(f"using the run's tokenizer {path}")
        return BPETokenizer.load(path), path
    key = _sha(source_key(d, "train"), cfg.model.vocab_size, d.tokenizer_train_stories, TOKENIZER_RECIPE)
    path = root / "tokenizers" / f"{key}.json"
    if path.is_file():
        log(f"using cached tokenizer {path}")
        return BPETokenizer.load(path), path
    stories = train.get()[:d.tokenizer_train_stories]
    t0 = time.perf_counter()
    tokenizer = BPETokenizer.train(stories, cfg.model.vocab_size)
    _atomic_save(tokenizer, path)
    log(f"trained a {tokenizer.vocab_size}-token BPE on {len(stories):,} stories in "
        f"{time.perf_counter() - t0:.1f}s -> {path}")
    return tokenizer, path


def _atomic_save(tokenizer: BPETokenizer, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        tokenizer.save(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _stream(cfg: RunConfig, split: str, tokenizer: BPETokenizer, root: Path, train: _TrainStories,
            log: Callable[..., None]) -> TokenStream:
    key = source_key(cfg.data, split)
    folder = root / _sha(key, tokenizer.fingerprint, split)
    if (folder / "meta.json").is_file():
        stream = TokenStream.open(folder)
        log(f"using cached {split} tokens {folder} ({stream.n_stories:,} stories, {len(stream):,} tokens)")
        return stream
    t0 = time.perf_counter()
    stories = train.get() if split == "train" else load_stories(cfg.data, "val")
    stream = build_token_stream(stories, tokenizer, folder, source=key)
    log(f"tokenized {split}: {stream.n_stories:,} stories, {len(stream):,} tokens in "
        f"{time.perf_counter() - t0:.1f}s -> {folder}")
    return stream


def prepare_data(cfg: RunConfig, run_dir: Path | None, log: Callable[..., None] = print,
                 need_train: bool = True) -> PreparedData:
    """Resolve the tokenizer and the cached train/val token streams of ``cfg``.

    Tokenizer: ``data.tokenizer_path`` if set; else ``run_dir/tokenizer.json``
    if it exists (a resumed run keeps its ids); else a cached one keyed by
    (train source, vocab size, #stories), trained on the first
    ``data.tokenizer_train_stories`` training stories when absent. It is
    copied to ``run_dir/tokenizer.json`` whenever ``run_dir`` is given.
    Streams are built once per (source, tokenizer, split) and reused.
    ``need_train=False`` (evaluation) skips the training stream, so an eval
    never downloads or tokenizes training stories.
    """
    root = cache_root(cfg.data)
    if resolve_source(cfg.data) == "builtin":
        log(f"data: the built-in real stories. {ATTRIBUTION}")
    train = _TrainStories(cfg.data)
    tokenizer, tok_path = _resolve_tokenizer(cfg, run_dir, root, train, log)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"tokenizer {tok_path} has {tokenizer.vocab_size} tokens but model.vocab_size="
                          f"{cfg.model.vocab_size}; set model.vocab_size={tokenizer.vocab_size} or use a smaller "
                          f"tokenizer")
    if run_dir is not None:
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        target = run_dir / "tokenizer.json"
        if not target.exists() or not target.samefile(tok_path):
            _atomic_save(tokenizer, target)  # atomic: other ranks may be reading it
        tok_path = target
    return PreparedData(tokenizer=tokenizer,
                        train=_stream(cfg, "train", tokenizer, root, train, log) if need_train else None,
                        val=_stream(cfg, "val", tokenizer, root, train, log),
                        tokenizer_path=tok_path)


def encode_stories_for_eval(stories: Sequence[str], tokenizer: BPETokenizer) -> TokenStream:
    """Stories (e.g. from ``somoe eval --data FILE``) as an in-memory TokenStream.

    Same ``EOS s1 EOS ... sN EOS`` layout and attributes as a cached stream,
    but ``tokens`` is a plain ndarray and nothing is written to disk: an
    ad-hoc eval file should not fill the cache.
    """
    return encode_in_memory(stories, tokenizer, source="eval")
