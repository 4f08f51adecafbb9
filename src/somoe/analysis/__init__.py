"""Analysis of trained runs: key geometry, usage, specialisation, plots, ablation C and run comparison."""

from ..models.ffn.usage import entropy_bits, gini, normalized_entropy

__all__ = ["entropy_bits", "gini", "normalized_entropy"]
