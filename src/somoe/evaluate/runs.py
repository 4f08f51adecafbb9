"""Opening a trained run (or one of its checkpoints) for eval, generation and analysis."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..config import ConfigError, RunConfig
from ..data import BPETokenizer, TokenStream, encode_stories_for_eval, prepare_data, read_story_file
from ..models import LM, build_model
from ..train.checkpoint import (CheckpointError, check_checkpoint, check_tokenizer, list_checkpoints, load_config_from,
                               load_model_state, read_best, read_trainer_state)
from ..train.runtime import DEVICE_FLAG, resolve_device, setup_backends


@dataclass
class LoadedRun:
    cfg: RunConfig
    model: LM
    tokenizer: BPETokenizer
    checkpoint: Path
    run_dir: Path


def resolve_checkpoint(path: str | Path, which: str = "last") -> Path:
    """A step folder as given, or the last (or best) checkpoint of a run folder."""
    path = Path(path)
    if (path / "model.safetensors").is_file() or path.name.startswith("step-"):
        return path
    checkpoints = list_checkpoints(path)
    if not checkpoints:
        raise CheckpointError(f"{path} has no checkpoints; train first (somoe train --out {path})")
    if which == "best":
        best = read_best(path)
        for ckpt in checkpoints if best is None else ():  # runs from before checkpoints/best.json
            best = read_trainer_state(ckpt).get("best_step", best)
        match = [c for c in checkpoints if best is not None and c.name == f"step-{best:08d}"]
        if match:
            return match[0]
    return checkpoints[-1]


def load_run(path: str | Path, device: str = "auto", which: str = "last") -> LoadedRun:
    ckpt = resolve_checkpoint(path, which)
    check_checkpoint(ckpt)
    cfg = load_config_from(ckpt)
    tok_file = ckpt / "tokenizer.json"
    if not tok_file.is_file():
        tok_file = ckpt.parent.parent / "tokenizer.json"
    if not tok_file.is_file():
        raise CheckpointError(f"no tokenizer.json next to {ckpt}; copy the run's tokenizer.json there")
    check_tokenizer(ckpt, tok_file)
    dev = resolve_device(device, setting=DEVICE_FLAG)
    setup_backends(dev)  # eval, generate and the analyses run with training's allocator and matmul settings
    model = build_model(cfg.model, dev)
    load_model_state(ckpt, model)
    # the schedules (top-k warmup, SoM rates used by an adapting eval) need the training progress
    state = read_trainer_state(ckpt)
    model.set_progress(int(state.get("step", 0)), int(state.get("total_steps", 0)))
    model.eval()
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt
    return LoadedRun(cfg, model, BPETokenizer.load(tok_file), ckpt, run_dir)


# --- held-out token streams of a loaded run: its own validation split, or a text file -------------
def tokenizer_file(loaded: LoadedRun) -> Path:
    """The checkpoint's own tokenizer.json, else the run folder's."""
    tok = loaded.checkpoint / "tokenizer.json"
    return tok if tok.is_file() else loaded.run_dir / "tokenizer.json"


def run_val_stream(loaded: LoadedRun) -> TokenStream:
    """The run's validation split, tokenized with the run's own tokenizer (cached like ``somoe eval``)."""
    cfg = loaded.cfg
    cfg.data.tokenizer_path = str(tokenizer_file(loaded))
    return prepare_data(cfg, None, log=lambda *_: None, need_train=False).val


def file_stream(path: str | Path, loaded: LoadedRun) -> TokenStream:
    """A .txt/.jsonl/.parquet file of stories (or one long text) in the run's tokens."""
    path = Path(path)  # read_story_file names a missing file, a directory, binary or non-UTF-8 bytes in one line
    stream = encode_stories_for_eval(read_story_file(str(path)), loaded.tokenizer)
    if len(stream) < 2:
        raise ConfigError(f"{path} holds no text to evaluate; pass a non-empty file")
    return stream
