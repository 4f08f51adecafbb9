"""SoME key stores, usage and dormancy per layer, read straight from checkpoint files.

Only ``model.safetensors`` and ``trainer_state.json`` are opened (no model is
built, so no frozen experts are regenerated): a run with dozens of checkpoints
loads in a blink. Tensor names are the model's own (``blocks.{i}.ffn.key_store``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import safe_open

from ..train.checkpoint import STEP_DIR, CheckpointError, check_checkpoint, list_checkpoints, read_trainer_state

_KEY = re.compile(r"^blocks\.(\d+)\.ffn\.key_store$")


@dataclass
class LayerKeys:
    layer: int
    keys: np.ndarray  # E x D, the key store
    usage: np.ndarray  # E, usage EMA (sums to 1)
    dormant_streak: np.ndarray  # E, self-organizing updates dormant in a row (0 = active)

    @property
    def num_experts(self) -> int:
        return self.keys.shape[0]


@dataclass
class CheckpointKeys:
    path: Path
    step: int
    tokens: int
    layers: dict[int, LayerKeys]


def load_checkpoint_keys(ckpt: str | Path) -> CheckpointKeys:
    """Key store, usage EMA and dormant streaks of every SoME layer of one checkpoint."""
    ckpt = Path(ckpt)
    check_checkpoint(ckpt)
    state = read_trainer_state(ckpt)
    layers: dict[int, LayerKeys] = {}
    with safe_open(str(ckpt / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
        for name in sorted(names):
            match = _KEY.match(name)
            if not match:
                continue
            prefix = name[: -len("key_store")]
            i = int(match.group(1))
            keys = f.get_tensor(name).float().numpy()
            E = keys.shape[0]
            usage = (f.get_tensor(prefix + "usage_ema").double().numpy() if prefix + "usage_ema" in names
                     else np.full(E, 1.0 / E))
            streak = (f.get_tensor(prefix + "dormant_streak").numpy().astype(np.int64)
                      if prefix + "dormant_streak" in names else np.zeros(E, dtype=np.int64))
            layers[i] = LayerKeys(i, keys, usage, streak)
    return CheckpointKeys(ckpt, int(state.get("step", 0)), int(state.get("tokens_seen", 0)), layers)


def select_checkpoints(run_dir: str | Path, spec: str = "all") -> list[Path]:
    """``all``, ``last``, or comma-separated steps (``100,400``) or step folder names of a run."""
    run_dir = Path(run_dir)
    found = list_checkpoints(run_dir)
    if not found:
        raise CheckpointError(f"{run_dir} has no checkpoints; analyze needs a trained run folder")
    if spec == "all":
        return found
    if spec == "last":
        return found[-1:]
    by_step = {int(STEP_DIR.match(p.name).group(1)): p for p in found}
    chosen = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        try:
            step = int(item.split("-")[1]) if item.startswith("step-") else int(item)
        except (ValueError, IndexError):
            raise CheckpointError(f"--checkpoints item {item!r} is not a step number; use all, last or e.g. "
                                  f"100,400") from None
        if step not in by_step:
            raise CheckpointError(f"{run_dir} has no checkpoint at step {step}; it has steps "
                                  f"{', '.join(str(s) for s in sorted(by_step))}")
        chosen.append(by_step[step])
    return sorted(set(chosen), key=lambda p: p.name)


def load_run_keys(run_dir: str | Path, spec: str = "all") -> list[CheckpointKeys]:
    """Key states of the chosen checkpoints, oldest first; an error if the run has no SoME layer."""
    states = [load_checkpoint_keys(p) for p in select_checkpoints(run_dir, spec)]
    if not states[-1].layers:
        raise CheckpointError(f"{run_dir} has no SoME layers (no key_store in its checkpoints); "
                              f"analyze works on runs trained with model.ffn=some")
    return states
