"""The frozen experts as the grouped dispatch computes with them: cast once, zero biases left out.

fp32-stored experts computed in bf16 (autocast on a GPU) were cast in every forward and again in
every backward: for seed000_some, 1.6B weights read as fp32 and written as bf16 three times a
step, ~38 GB of memory traffic for values that never change. :class:`FrozenCompute` keeps one
bf16 copy of ``w1`` and ``w2`` (+50% of the fp32 bytes; ``model.some.expert_dtype=bf16`` stores
them in bf16 alone) and the grouped path reads it. The per-expert loop (host counts, the CPU)
keeps casting one expert at a time while it is in cache, and holds no copy.

Frozen biases are generated as zeros; gathering them per row and adding them costs two passes
over the expert activations for nothing, so a bias found all zero is passed as ``None``.

Staleness: eagerly, every call compares each source's ``(version, data_ptr)`` (host metadata, no
device read) with the last refresh, so an in-place change, a load or a move is seen at the next
forward. Traced by ``torch.compile`` the copy is read as it is (the check is host logic), so the
layer refreshes it eagerly wherever its experts change (generation, ``load_state_dict``, ``.to()``),
in place when the shapes agree: a compiled graph or a captured CUDA graph keeps reading the same
memory, with new values.
"""

from __future__ import annotations

import torch

Experts = tuple  # (w1_EDF, b1_EF | None, w2_EFD, b2_ED | None)


def _stamp(experts: Experts) -> tuple:
    return tuple(None if t is None else (t._version, t.data_ptr(), t.device, t.dtype, tuple(t.shape))
                 for t in experts)


class FrozenCompute:
    """Per-layer state: which frozen biases are zero, and the weights' copy in the compute dtype."""

    def __init__(self) -> None:
        self._stamp: tuple | None = None
        self.zero_bias = (False, False)
        self.cast: tuple[torch.Tensor, torch.Tensor] | None = None  # (w1, w2) in the compute dtype

    @torch.no_grad()
    def refresh(self, experts: Experts) -> None:
        """Re-read the sources if they changed since the last call: zero biases (one host read per
        change) and the cast copy (rewritten in place where its shape and device still fit)."""
        if experts[0].is_meta:  # not materialised yet: nothing to read
            self.drop()
            return
        stamp = _stamp(experts)
        if stamp == self._stamp:
            return
        w1, b1, w2, b2 = experts
        self.zero_bias = tuple(b is not None and not bool(b.any()) for b in (b1, b2))
        if self.cast is not None:
            self._fill(w1, w2, self.cast[0].dtype)
        self._stamp = _stamp(experts)

    @torch.no_grad()
    def _fill(self, w1: torch.Tensor, w2: torch.Tensor, dtype: torch.dtype) -> None:
        fits = (self.cast is not None and self.cast[0].dtype == dtype and self.cast[0].shape == w1.shape
                and self.cast[1].shape == w2.shape and self.cast[0].device == w1.device)
        if fits:
            self.cast[0].copy_(w1)
            self.cast[1].copy_(w2)
        else:
            self.cast = (w1.to(dtype), w2.to(dtype))

    def prepare(self, experts: Experts, dtype: torch.dtype) -> None:
        """Eagerly: the copy in ``dtype`` exists and is current (before a compiled step traces it)."""
        self.refresh(experts)
        if experts[0].dtype != dtype and (self.cast is None or self.cast[0].dtype != dtype):
            self._fill(experts[0], experts[2], dtype)

    def drop(self) -> None:
        self.cast, self._stamp = None, None

    def experts(self, experts: Experts, dtype: torch.dtype, cast: bool) -> Experts:
        """``experts`` for computing in ``dtype``: zero biases as None and, with ``cast`` (the grouped
        path), the weights from the cached copy. Traced, nothing is checked or created: without a
        prepared copy the weights go as they are (the dispatch casts them)."""
        w1, b1, w2, b2 = experts
        if not torch.compiler.is_compiling():
            if cast:
                self.prepare(experts, dtype)
            else:
                self.refresh(experts)
        b1 = None if self.zero_bias[0] else b1
        b2 = None if self.zero_bias[1] else b2
        if cast and w1.dtype != dtype and self.cast is not None and self.cast[0].dtype == dtype:
            w1, w2 = self.cast
        return w1, b1, w2, b2
