"""``somoe eval``: a run's (or a file's) loss, perplexity and bits per byte."""

from __future__ import annotations

from pathlib import Path

from .data import eval_batches, prepare_data, read_story_file
from .data.prepare import encode_stories_for_eval
from .eval import evaluate
from .runs import load_run
from .train.runtime import autocast_factory, resolve_precision


def evaluate_run(run: str | Path, data: str | None = None, adapt: bool = False, max_batches: int = 0,
                 which: str = "last", device: str = "auto", batch_size: int = 8) -> dict:
    """Evaluate a run folder or checkpoint on its validation split or on a local file."""
    loaded = load_run(run, device=device, which=which)
    cfg = loaded.cfg
    if data:
        stream = encode_stories_for_eval(read_story_file(data), loaded.tokenizer)
    else:
        cfg.data.tokenizer_path = str(loaded.checkpoint / "tokenizer.json") \
            if (loaded.checkpoint / "tokenizer.json").is_file() else str(loaded.run_dir / "tokenizer.json")
        stream = prepare_data(cfg, None, log=lambda *_: None, need_train=False).val
    model = loaded.model
    dev = next(model.parameters()).device
    precision = resolve_precision(cfg.train.precision, dev)
    if adapt:
        for layer in model.self_organizing_layers():
            layer.cfg.adapt_at_inference = True
    windows = eval_batches(stream, cfg.data.seq_len, batch_size, max_batches, pad_id=loaded.tokenizer.pad_id)
    result = evaluate(model, windows, loaded.tokenizer.token_byte_lengths(), dev,
                      autocast_factory(precision, dev), adapt=adapt)
    out = result.as_dict()
    out["checkpoint"] = str(loaded.checkpoint)
    return out
