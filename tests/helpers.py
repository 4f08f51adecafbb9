"""Shared builders for tests: tiny configs on a small slice of the built-in corpus."""

from __future__ import annotations

from somoe.config import load_config

TINY = [
    "model.vocab_size=320", "model.d_model=32", "model.n_layers=2", "model.n_heads=4",
    "model.max_seq_len=32", "data.seq_len=32", "data.builtin_train_stories=200",
    "data.builtin_val_stories=20", "data.tokenizer_train_stories=200", "train.batch_size=8",
    "train.max_steps=6", "train.eval_every=3", "train.eval_batches=4", "train.log_every=1",
    "train.precision=fp32", "train.lr=3e-3", "train.warmup_steps=2", "train.device=cpu",
]


def tiny_config(cache_dir, *overrides: str):
    """A debug-sized RunConfig whose data cache lives in ``cache_dir``."""
    return load_config(preset="debug", overrides=TINY + [f"data.cache_dir={cache_dir}", *overrides])
