"""Self-describing, atomically written checkpoints: safetensors + JSON, no pickle.

Layout of ``RUN/checkpoints/step-00001200/``::

    model.safetensors      model state dict (frozen SoME experts stored as a seed + hash)
    optimizer.safetensors  AdamW moments and step counters, keyed "state.<param idx>.<name>"
    rng.safetensors        torch CPU (and CUDA) generator states
    trainer_state.json     step, tokens seen, best val loss, wall time, optimizer param groups
    config.yaml            the resolved run config (enough to rebuild the model)
    tokenizer.json         the run's tokenizer

A checkpoint is written into ``step-XXXXXXXX.tmp`` and renamed into place, so a
kill mid-write leaves the previous checkpoint loadable.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..config import ConfigError, RunConfig, from_dict, load_yaml, save_config

STEP_DIR = re.compile(r"^step-(\d{8})$")
REQUIRED = ("model.safetensors", "trainer_state.json", "config.yaml")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded, with the reason and what to do."""


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    state = optimizer.state_dict()
    tensors = {}
    for idx, slot in state["state"].items():
        for name, value in slot.items():
            tensor = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"state.{idx}.{name}"] = tensor.detach().cpu().contiguous()
    return tensors, state["param_groups"]


def _restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                       groups: list[dict]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = tensor
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    trainer_state: dict[str, Any], cfg: RunConfig, keep_last: int = 0,
                    protect: tuple[int, ...] = ()) -> Path:
    """Write ``step-XXXXXXXX`` atomically and prune old ones (keeping ``protect``ed steps)."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f"step-{step:08d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    model_state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(_dedupe_shared(model_state), str(tmp / "model.safetensors"))
    state = dict(trainer_state)
    if optimizer is not None:
        tensors, groups = _optimizer_tensors(optimizer)
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        state["optimizer_param_groups"] = groups
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_file(rng, str(tmp / "rng.safetensors"))
    (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2), encoding="utf-8")
    save_config(cfg, tmp / "config.yaml")
    tokenizer = Path(run_dir) / "tokenizer.json"
    if tokenizer.is_file():
        shutil.copy2(tokenizer, tmp / "tokenizer.json")
    for f in tmp.iterdir():  # make the bytes durable before the rename publishes them
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    if keep_last > 0:
        prune_checkpoints(root, keep_last, protect)
    return final


def _dedupe_shared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses aliased tensors (tied head): store a tied weight once, clone the alias."""
    seen: dict[int, str] = {}
    out = {}
    for key, tensor in state.items():
        ptr = tensor.data_ptr()
        out[key] = tensor.clone() if ptr in seen and tensor.numel() else tensor
        seen.setdefault(ptr, key)
    return out


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name)), key=lambda p: p.name)


def prune_checkpoints(root: Path, keep_last: int, protect: tuple[int, ...] = ()) -> None:
    steps = sorted((p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name)), key=lambda p: p.name)
    for path in steps[:-keep_last]:
        if int(STEP_DIR.match(path.name).group(1)) not in protect:
            shutil.rmtree(path, ignore_errors=True)


def check_checkpoint(path: Path) -> None:
    """Raise CheckpointError unless every file of ``path`` is present and readable."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist; pass a run folder or a step-XXXXXXXX folder")
    for name in REQUIRED:
        if not (path / name).is_file():
            raise CheckpointError(f"checkpoint {path} lacks {name} (interrupted copy?); use an earlier checkpoint")
    for name in ("model.safetensors", "optimizer.safetensors", "rng.safetensors"):
        file = path / name
        if file.is_file():
            _check_safetensors(file)
    try:
        read_trainer_state(path)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"checkpoint {path}: trainer_state.json is corrupt; use an earlier checkpoint") from None


def _corrupt(file: Path, err: Exception) -> CheckpointError:
    return CheckpointError(f"checkpoint file {file} is truncated or corrupt ({str(err).splitlines()[0][:80]}); "
                           f"delete that checkpoint folder and resume from an earlier one")


def _check_safetensors(file: Path) -> None:
    """Header and size check without reading the tensors: safetensors refuses a file whose
    length does not match its header, so truncation is caught at the cost of one header read."""
    try:
        with safe_open(str(file), framework="pt") as f:
            f.keys()
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise _corrupt(file, err) from None


def _read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise _corrupt(file, err) from None


def read_trainer_state(path: Path) -> dict[str, Any]:
    """The ``trainer_state.json`` of checkpoint ``path`` (step, total_steps, best_step, ...)."""
    return json.loads((Path(path) / "trainer_state.json").read_text(encoding="utf-8"))


def find_resumable(run_dir: Path, log=print) -> Path | None:
    """Newest checkpoint that loads; a broken newer one is reported and skipped."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            check_checkpoint(path)
            return path
        except CheckpointError as err:
            log(f"warning: skipping {path.name}: {err}")
    return None


def load_config_from(path: Path) -> RunConfig:
    try:
        return from_dict(RunConfig, load_yaml(Path(path) / "config.yaml"))
    except ConfigError as err:
        raise CheckpointError(f"checkpoint {path}: config.yaml is invalid ({err})") from None


def load_model_state(path: Path, model: torch.nn.Module) -> None:
    state = _read_safetensors(Path(path) / "model.safetensors")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).splitlines()[0]
        raise CheckpointError(f"checkpoint {path} does not match the model: {first[:200]}") from None


def load_training_state(path: Path, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """Restore optimizer and RNG; return the trainer state dict."""
    path = Path(path)
    state = read_trainer_state(path)
    if optimizer is not None and (path / "optimizer.safetensors").is_file():
        _restore_optimizer(optimizer, _read_safetensors(path / "optimizer.safetensors"),
                           state.get("optimizer_param_groups", []))
    rng_file = path / "rng.safetensors"
    if rng_file.is_file():
        rng = _read_safetensors(rng_file)
        torch.set_rng_state(rng["cpu"])
        cuda = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda"))]
        if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
    return state
