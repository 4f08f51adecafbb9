"""FFN variants. Importing this package registers every built-in variant."""

from .base import FFN, SelfOrganizing, in_recompute, recomputing
from .registry import available_ffns, build_ffn, register_ffn
from . import dense  # noqa: F401  (registers "dense")

for _optional in ("some", "moe"):
    try:  # variants land in later modules; import them when present
        __import__(f"{__name__}.{_optional}")
    except ModuleNotFoundError as _err:
        if _err.name != f"{__name__}.{_optional}":
            raise

__all__ = ["FFN", "SelfOrganizing", "available_ffns", "build_ffn", "in_recompute", "recomputing", "register_ffn"]
