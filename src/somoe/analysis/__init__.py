"""Analysis of trained runs: expert usage statistics (and, later, key geometry and plots)."""

from ..models.ffn.usage import entropy_bits, gini, normalized_entropy

__all__ = ["entropy_bits", "gini", "normalized_entropy"]
