"""Models: one transformer backbone family with pluggable FFNs."""

from .transformer import IGNORE_INDEX, LM, LMOutput, build_model

__all__ = ["IGNORE_INDEX", "LM", "LMOutput", "build_model"]
