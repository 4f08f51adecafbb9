"""``somoe eval``: a run's (or a file's) loss, perplexity and bits per byte."""

from __future__ import annotations

from pathlib import Path

from ..data import eval_batches
from ..metrics import EvalResult, evaluate
from .runs import LoadedRun, file_stream, load_run, run_val_stream
from ..train.runtime import autocast_factory, resolve_precision


def evaluate_loaded(loaded: LoadedRun, batches, adapt: bool = False, on_batch=None) -> EvalResult:
    """Score ``batches`` with a loaded run on its device, in the precision its config resolves to."""
    dev = next(loaded.model.parameters()).device
    autocast = autocast_factory(resolve_precision(loaded.cfg.train.precision, dev), dev)
    return evaluate(loaded.model, batches, loaded.tokenizer.token_byte_lengths(), dev, autocast, adapt=adapt,
                    on_batch=on_batch)


def evaluate_run(run: str | Path, data: str | None = None, adapt: bool = False, max_batches: int = 0,
                 which: str = "last", device: str = "auto", batch_size: int = 8) -> dict:
    """Evaluate a run folder or checkpoint on its validation split or on a local file."""
    loaded = load_run(run, device=device, which=which)
    cfg = loaded.cfg
    stream = file_stream(data, loaded) if data else run_val_stream(loaded)
    windows = eval_batches(stream, cfg.data.seq_len, batch_size, max_batches, pad_id=loaded.tokenizer.pad_id)
    out = evaluate_loaded(loaded, windows, adapt=adapt).as_dict()
    out["checkpoint"] = str(loaded.checkpoint)
    return out
