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

import hashlib
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
    """Write ``step-XXXXXXXX`` atomically and prune old ones (keeping ``protect``ed steps and the best).

    Refuses non-finite weights. A failed write (a full disk) removes its temporary folder, keeps
    every earlier checkpoint, and raises one CheckpointError naming the folder and the space needed.
    """
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f"step-{step:08d}.tmp"
    model_state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    _refuse_non_finite(model_state, step)
    tensors, groups = _optimizer_tensors(optimizer) if optimizer is not None else ({}, None)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write_files(tmp, run_dir, model_state, tensors, groups, trainer_state, cfg)
    except (SafetensorError, OSError) as err:
        shutil.rmtree(tmp, ignore_errors=True)
        need = sum(t.numel() * t.element_size() for t in [*model_state.values(), *tensors.values()])
        raise CheckpointError(f"could not write checkpoint {final.name} in {root} ({_first_line(err)}): "
                              f"{_free_space_note(root, need)}; the previous checkpoints are intact, "
                              f"free space and rerun with --resume auto") from None
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    if keep_last > 0:
        prune_checkpoints(root, keep_last, protect)
    return final


def _write_files(tmp: Path, run_dir: Path, model_state: dict[str, torch.Tensor], optimizer_tensors: dict,
                 optimizer_groups: list[dict] | None, trainer_state: dict[str, Any], cfg: RunConfig) -> None:
    tmp.mkdir()
    save_file(_dedupe_shared(model_state), str(tmp / "model.safetensors"))
    state = dict(trainer_state)
    if optimizer_groups is not None:
        save_file(optimizer_tensors, str(tmp / "optimizer.safetensors"))
        state["optimizer_param_groups"] = optimizer_groups
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


def _first_line(err: Exception) -> str:
    return (str(err).splitlines() or [type(err).__name__])[0][:120]


def _free_space_note(folder: Path, need_bytes: int) -> str:
    free = shutil.disk_usage(folder).free
    return f"a checkpoint needs about {need_bytes / 2**20:.1f} MiB there, {free / 2**20:.1f} MiB are free"


def _non_finite(state: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor holding a NaN or an infinity, else None."""
    return next((name for name, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())),
                None)


def _refuse_non_finite(model_state: dict[str, torch.Tensor], step: int) -> None:
    name = _non_finite(model_state)
    if name is not None:
        raise CheckpointError(f"refusing to write checkpoint step-{step:08d}: model weight {name} is not finite; "
                              f"the earlier checkpoints (and the best) are kept; lower train.lr")


def refresh_trainer_state(path: Path, trainer_state: dict[str, Any]) -> None:
    """Rewrite a checkpoint's ``trainer_state.json`` in place (an eval after the save moved the best), atomically."""
    path = Path(path)
    state = {**read_trainer_state(path), **trainer_state}
    tmp = path / "trainer_state.json.tmp"
    tmp.write_text(json.dumps(state, indent=2), encoding="utf-8")
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path / "trainer_state.json")


BEST_FILE = "best.json"  # checkpoints/best.json names the checkpoint with the lowest validation loss


def write_best(run_dir: Path, step: int, val_loss: float) -> None:
    root = Path(run_dir) / "checkpoints"
    tmp = root / (BEST_FILE + ".tmp")
    tmp.write_text(json.dumps({"step": step, "checkpoint": f"step-{step:08d}", "val_loss": val_loss}) + "\n",
                   encoding="utf-8")
    os.replace(tmp, root / BEST_FILE)


def read_best(run_dir: Path) -> int | None:
    """The step of the run's best checkpoint per ``checkpoints/best.json``; None without one."""
    try:
        return int(json.loads((Path(run_dir) / "checkpoints" / BEST_FILE).read_text(encoding="utf-8"))["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


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
    """Keep the newest ``keep_last`` checkpoints, the ``protect``ed steps and the one best.json names."""
    steps = sorted((p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name)), key=lambda p: p.name)
    protect = (*protect, read_best(root.parent))
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
            check_safetensors(file)
    try:
        read_trainer_state(path)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"checkpoint {path}: trainer_state.json is corrupt; use an earlier checkpoint") from None


def _corrupt(file: Path, err: Exception) -> CheckpointError:
    return CheckpointError(f"checkpoint file {file} is truncated or corrupt ({str(err).splitlines()[0][:80]}); "
                           f"delete that checkpoint folder and resume from an earlier one")


def check_safetensors(file: Path) -> None:
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
    bad = _non_finite(state)
    if bad is not None:  # written before saves refused them
        raise CheckpointError(f"checkpoint {path} holds non-finite weights ({bad}); use an earlier checkpoint "
                              f"(--checkpoint best)")
    mismatch = _architecture_mismatch(state, model.state_dict())
    if mismatch:
        raise CheckpointError(f"checkpoint {path} does not match the model ({mismatch}); "
                              f"build the model from the checkpoint's config.yaml")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).splitlines()[0]
        raise CheckpointError(f"checkpoint {path} does not match the model: {first[:200]}") from None


def _architecture_mismatch(saved: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], show: int = 3) -> str:
    """Which keys and shapes differ between a checkpoint and a model, in a few words ('' if none)."""
    def listed(names: list[str]) -> str:
        more = f" (+{len(names) - show} more)" if len(names) > show else ""
        return ", ".join(names[:show]) + more

    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    shapes = [f"{k} {tuple(saved[k].shape)} vs {tuple(expected[k].shape)}" for k in sorted(set(saved) & set(expected))
              if saved[k].shape != expected[k].shape]
    parts = [f"{label}: {listed(names)}" for label, names in
             (("missing from the checkpoint", missing), ("not in the model", unexpected),
              ("shape checkpoint vs model", shapes)) if names]
    return "; ".join(parts)


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


def tokenizer_digest(path: Path) -> str:
    """sha256 of a tokenizer.json's canonical JSON (vocabulary, merges, specials; not its whitespace)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"tokenizer {path} is corrupt ({str(err).splitlines()[0][:60]}); copy the run's "
                              f"tokenizer.json back from a backup, or retrain the run") from None
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def check_tokenizer(checkpoint: Path, tokenizer_file: Path) -> None:
    """Raise CheckpointError if ``tokenizer_file`` is not the tokenizer ``checkpoint`` was trained with
    (a checkpoint from before the digest was stored is taken on trust)."""
    expected = read_trainer_state(checkpoint).get("tokenizer_sha256")
    if expected is None:
        return
    found = tokenizer_digest(tokenizer_file)
    if found != expected:
        raise CheckpointError(f"tokenizer {tokenizer_file} (sha256 {found[:12]}) is not the one {Path(checkpoint).name} "
                              f"was trained with (sha256 {expected[:12]}); use the run's own tokenizer.json")
