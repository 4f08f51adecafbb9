"""Shipped YAML presets (``somoe/presets/*.yaml``), with single inheritance.

A preset may say ``inherit: other_preset``; its keys are deep-merged over the
parent's. Command-line ``key=value`` overrides are applied last.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import yaml

from .loading import ConfigError, apply_overrides, from_dict, load_yaml, merge, to_dict
from .schema import RunConfig

PRESET_PACKAGE = "somoe.presets"


def list_presets() -> list[str]:
    root = resources.files(PRESET_PACKAGE)
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def preset_path(name: str) -> Path:
    path = Path(str(resources.files(PRESET_PACKAGE).joinpath(f"{name}.yaml")))
    if not path.is_file():
        raise ConfigError(f"unknown preset '{name}'; available: {', '.join(list_presets())}")
    return path


def _resolve(data: dict, seen: tuple[str, ...]) -> dict:
    parent = data.pop("inherit", None)
    if parent is None:
        return data
    if parent in seen:
        raise ConfigError(f"preset inheritance loops through '{parent}'")
    base = _resolve(load_yaml(preset_path(parent)), seen + (parent,))
    return merge(base, data)


def load_config(preset: str | None = None, config_file: str | None = None,
                overrides: list[str] | None = None) -> RunConfig:
    """Resolve preset/config file + overrides into a validated RunConfig."""
    if preset and config_file:
        raise ConfigError("give either --preset or --config, not both")
    data: dict = {}
    if preset:
        data = _resolve(load_yaml(preset_path(preset)), (preset,))
        data.setdefault("name", preset)
    elif config_file:
        data = _resolve(load_yaml(config_file), ())
    data = apply_overrides(data, list(overrides or []))
    return from_dict(RunConfig, data)


def save_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")
