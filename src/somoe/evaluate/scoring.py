"""``somoe eval``: a run's (or a file's) loss, perplexity and bits per byte."""

from __future__ import annotations

from pathlib import Path

from ..config import ConfigError
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
                 which: str = "last", device: str = "auto", batch_size: int = 8, seq_len: int = 0) -> dict:
    """Evaluate a run folder or checkpoint on its validation split or on a local file, in non-overlapping
    windows of ``seq_len`` tokens (0: the run's ``data.seq_len``, as its training evals)."""
    loaded = load_run(run, device=device, which=which)
    cfg = loaded.cfg
    window = seq_len or cfg.data.seq_len
    if window < 2:
        raise ConfigError(f"--seq-len {seq_len} is too short to score; pass at least 2 (or 0 for the run's "
                          f"{cfg.data.seq_len})")
    try:
        loaded.model.extend_context(window)
    except ValueError as err:
        raise ConfigError(f"--seq-len {window}: {err} in {run}; pass at most {cfg.model.max_seq_len}") from None
    stream = file_stream(data, loaded) if data else run_val_stream(loaded)
    windows = eval_batches(stream, window, batch_size, max_batches, pad_id=loaded.tokenizer.pad_id)
    out = evaluate_loaded(loaded, windows, adapt=adapt).as_dict()
    out["checkpoint"], out["seq_len"] = str(loaded.checkpoint), window
    return out
