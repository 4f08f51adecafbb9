"""Shared builders for tests: tiny configs on a small slice of the shipped real stories."""

from __future__ import annotations

from somoe.config import load_config
from somoe.data import builtin_stories

# data.builtin_*_stories cap the built-in corpus (the shipped TinyStories train.txt/dev.txt) to its
# first N stories, so that tokenizers and caches build in well under a second
TINY = [
    "model.vocab_size=320", "model.d_model=32", "model.n_layers=2", "model.n_heads=4",
    "model.max_seq_len=32", "data.seq_len=32", "data.builtin_train_stories=100",
    "data.builtin_val_stories=20", "data.tokenizer_train_stories=100", "train.batch_size=8",
    "train.max_steps=6", "train.eval_every=3", "train.eval_batches=4", "train.log_every=1",
    "train.precision=fp32", "train.lr=3e-3", "train.warmup_steps=2", "train.device=cpu",
]


def tiny_config(cache_dir, *overrides: str):
    """A debug-sized RunConfig whose data cache lives in ``cache_dir``."""
    return load_config(preset="debug", overrides=TINY + [f"data.cache_dir={cache_dir}", *overrides])


def shipped_stories(n: int, start: int = 0) -> list[str]:
    """``n`` real stories of the shipped training file from index ``start`` (disjoint slices for distinct texts)."""
    stories = builtin_stories("train")
    assert start + n <= len(stories), f"only {len(stories)} shipped stories"
    return stories[start:start + n]
