"""Numeric command-line flags with their range: ``type=count(1)``, ``type=number(0, 1, low_open=True)``.

Every int and float flag of every verb takes one of these, so a negative, zero, NaN or huge value
is refused by the parser in one line naming the flag and the range, before anything is loaded
(``tests/test_bad_input.py`` fails on a numeric flag without one). The bounds are attributes, so
the test derives its out-of-range values from them.
"""

from __future__ import annotations

import argparse
import math

BIG = 10**9  # the default ceiling of a count: far above any sensible batch, token or step count


class Ranged:
    """An argparse ``type``: parse an int (``integer=True``) or a finite float, within [lo, hi]."""

    def __init__(self, lo: float, hi: float, integer: bool, low_open: bool = False):
        self.lo, self.hi, self.integer, self.low_open = lo, hi, integer, low_open
        self.__name__ = "integer" if integer else "number"  # argparse names the type in its messages

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a number"
        low = f"> {self.lo:g}" if self.low_open else f">= {self.lo:g}"
        return f"{kind} {low} and <= {self.hi:g}"

    def __call__(self, text: str):
        try:
            value = int(text) if self.integer else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {self.describe()}") from None
        if not math.isfinite(value) or value < self.lo or value > self.hi or (self.low_open and value == self.lo):
            raise argparse.ArgumentTypeError(f"{text} is out of range: give {self.describe()}")
        return value


def count(lo: int = 0, hi: int = BIG) -> Ranged:
    """An integer flag in [lo, hi]."""
    return Ranged(lo, hi, integer=True)


def number(lo: float = 0.0, hi: float = 1e6, low_open: bool = False) -> Ranged:
    """A finite float flag in [lo, hi] (or (lo, hi] with ``low_open``)."""
    return Ranged(lo, hi, integer=False, low_open=low_open)
