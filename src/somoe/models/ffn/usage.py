"""Expert-usage inequality: Gini coefficient and Shannon entropy (the seeds' readouts).

Pure functions of a usage vector (counts or shares, any array-like); the
SoME layer's readouts and the analysis tools both use them.
"""

from __future__ import annotations

import math

import torch


def _shares(p) -> torch.Tensor:
    """Non-negative float64 shares summing to 1 (all-zero input is left as zeros)."""
    t = torch.as_tensor(p, dtype=torch.float64).detach().cpu().flatten()
    if t.numel() == 0:
        raise ValueError("usage vector is empty")
    if (t < 0).any():
        raise ValueError("usage vector has negative entries")
    total = t.sum()
    return t / total if total > 0 else t


def gini(p) -> float:
    """Gini coefficient of usage over E experts: 0 = even, (E-1)/E = one expert takes all.

    ``sum_ij |p_i - p_j| / (2 E sum_i p_i)``, computed from the sorted shares
    as ``2 sum_i i p_(i) / E - (E + 1) / E`` (i = 1..E ascending).
    """
    s = torch.sort(_shares(p)).values
    E = s.numel()
    if s.sum() <= 0:
        return 0.0
    ranks = torch.arange(1, E + 1, dtype=torch.float64)
    return float(2.0 * (ranks * s).sum() / E - (E + 1) / E)


def entropy_bits(p) -> float:
    """Shannon entropy of the usage shares in bits (0 log 0 = 0); max log2 E when even."""
    s = _shares(p)
    nz = s[s > 0]
    return float(-(nz * torch.log2(nz)).sum()) if nz.numel() else 0.0


def normalized_entropy(p) -> float:
    """``entropy_bits(p) / log2 E`` in [0, 1] (1 for a single expert)."""
    E = torch.as_tensor(p).numel()
    return entropy_bits(p) / math.log2(E) if E > 1 else 1.0
