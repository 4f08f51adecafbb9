"""``somoe eval``: a run's (or a file's) loss, perplexity and bits per byte."""

from __future__ import annotations

from pathlib import Path

from .analysis.streams import file_stream, run_val_stream
from .data import eval_batches
from .eval import evaluate
from .runs import load_run
from .train.runtime import autocast_factory, resolve_precision


def evaluate_run(run: str | Path, data: str | None = None, adapt: bool = False, max_batches: int = 0,
                 which: str = "last", device: str = "auto", batch_size: int = 8) -> dict:
    """Evaluate a run folder or checkpoint on its validation split or on a local file."""
    loaded = load_run(run, device=device, which=which)
    cfg = loaded.cfg
    stream = file_stream(data, loaded) if data else run_val_stream(loaded)
    model = loaded.model
    dev = next(model.parameters()).device
    precision = resolve_precision(cfg.train.precision, dev)
    windows = eval_batches(stream, cfg.data.seq_len, batch_size, max_batches, pad_id=loaded.tokenizer.pad_id)
    result = evaluate(model, windows, loaded.tokenizer.token_byte_lengths(), dev,
                      autocast_factory(precision, dev), adapt=adapt)
    out = result.as_dict()
    out["checkpoint"] = str(loaded.checkpoint)
    return out
