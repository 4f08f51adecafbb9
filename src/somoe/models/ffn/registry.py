"""FFN variants by name, so a Block never needs an if-chain per variant.

``@register_ffn("name")`` on a class whose constructor takes the ModelConfig
makes ``model.ffn: name`` available in any config.
"""

from __future__ import annotations

from typing import Callable

from ...config import ConfigError, ModelConfig
from .base import FFN

_REGISTRY: dict[str, type[FFN]] = {}


def register_ffn(name: str) -> Callable[[type[FFN]], type[FFN]]:
    def decorator(cls: type[FFN]) -> type[FFN]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"FFN '{name}' registered twice")
        _REGISTRY[name] = cls
        return cls

    return decorator


def available_ffns() -> list[str]:
    return sorted(_REGISTRY)


def build_ffn(cfg: ModelConfig, layer_idx: int) -> FFN:
    try:
        cls = _REGISTRY[cfg.ffn]
    except KeyError:
        raise ConfigError(f"model.ffn={cfg.ffn!r} is unknown; use one of {', '.join(available_ffns())}") from None
    return cls(cfg, layer_idx)
