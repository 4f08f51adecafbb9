"""Gini and Shannon entropy of expert usage on distributions with known values."""

import math

import pytest
import torch

from somoe.models.ffn.usage import entropy_bits, gini, normalized_entropy


@pytest.mark.parametrize("E", [2, 8, 128])
def test_uniform_usage_is_even(E):
    assert gini([5] * E) == pytest.approx(0.0, abs=1e-12)
    assert entropy_bits([5] * E) == pytest.approx(math.log2(E))
    assert normalized_entropy([5] * E) == pytest.approx(1.0)


@pytest.mark.parametrize("E", [2, 8, 128])
def test_one_expert_takes_all(E):
    counts = torch.zeros(E)
    counts[E // 2] = 42
    assert gini(counts) == pytest.approx((E - 1) / E)
    assert entropy_bits(counts) == 0.0
    assert normalized_entropy(counts) == 0.0


def test_a_hand_computed_distribution():
    # shares (1/4, 1/4, 1/2): sum_ij |p_i - p_j| = 4 * 1/4 = 1; Gini = 1 / (2 * 3 * 1) = 1/6
    assert gini([1, 1, 2]) == pytest.approx(1 / 6)
    assert gini([2, 1, 1]) == pytest.approx(1 / 6)  # order does not matter
    # H = 2 * (1/4 * 2 bits) + 1/2 * 1 bit = 1.5 bits
    assert entropy_bits([1, 1, 2]) == pytest.approx(1.5)
    assert normalized_entropy([1, 1, 2]) == pytest.approx(1.5 / math.log2(3))
    # counts and shares give the same figures
    assert gini([0.25, 0.25, 0.5]) == pytest.approx(1 / 6)


def test_unused_experts_count_as_zero_usage():
    # (1/2, 0, 1/2, 0): 8 ordered pairs differ by 1/2, so Gini = 4 / (2 * 4 * 1) = 1/2; H = 1 bit
    assert gini([3, 0, 3, 0]) == pytest.approx(0.5)
    assert entropy_bits([3, 0, 3, 0]) == pytest.approx(1.0)


def test_negative_usage_is_rejected():
    with pytest.raises(ValueError, match="negative"):
        gini([1, -1])
