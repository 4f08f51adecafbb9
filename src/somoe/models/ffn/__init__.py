"""FFN variants. Importing this package registers every built-in variant."""

from . import dense, some  # noqa: F401  (register "dense" and "some")
from . import moe  # noqa: F401  (register "moe")
from .base import FFN, SelfOrganizing, in_recompute, recomputing
from .registry import available_ffns, build_ffn, register_ffn

__all__ = ["FFN", "SelfOrganizing", "available_ffns", "build_ffn", "in_recompute", "recomputing", "register_ffn"]
