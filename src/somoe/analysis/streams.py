"""Held-out token streams of a loaded run: its own validation split, or a text file."""

from __future__ import annotations

from pathlib import Path

from ..config import ConfigError
from ..data import TokenStream, encode_stories_for_eval, prepare_data, read_story_file
from ..runs import LoadedRun


def run_val_stream(loaded: LoadedRun) -> TokenStream:
    """The run's validation split, tokenized with the run's own tokenizer (cached like ``somoe eval``)."""
    cfg = loaded.cfg
    tok = loaded.checkpoint / "tokenizer.json"
    cfg.data.tokenizer_path = str(tok if tok.is_file() else loaded.run_dir / "tokenizer.json")
    return prepare_data(cfg, None, log=lambda *_: None, need_train=False).val


def file_stream(path: str | Path, loaded: LoadedRun) -> TokenStream:
    """A .txt/.jsonl/.parquet file of stories (or one long text) in the run's tokens."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} does not exist; pass a .txt/.jsonl/.parquet file of text")
    stream = encode_stories_for_eval(read_story_file(str(path)), loaded.tokenizer)
    if len(stream) < 2:
        raise ConfigError(f"{path} holds no text to evaluate; pass a non-empty file")
    return stream
