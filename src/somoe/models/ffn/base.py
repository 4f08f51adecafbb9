"""What every FFN variant provides, and how the trainer talks to stateful ones.

An FFN maps ``x_BTD -> (y_BTD, aux_loss)`` where ``aux_loss`` is a scalar
tensor to add to the LM loss, or ``None``. A routed FFN also takes ``valid_BT``
(bool, optional): PAD positions (False) stay out of its statistics, tallies and
aux loss. Beyond that, an FFN may:

* report **readouts** (usage Gini, entropy, ...) accumulated over the forwards
  since the last ``reset_readouts()``; the evaluator resets before an eval and
  reads after it;
* carry **non-gradient state** (SoME keys). Such a layer implements
  :class:`SelfOrganizing`: during training forwards it only accumulates
  statistics; the trainer all-reduces ``som_statistics()`` (SUM) across ranks
  and then calls ``self_organize(step, total_steps)`` once per optimizer step.

Activation checkpointing recomputes forwards during backward; statistics must
not be counted twice, so the transformer sets :data:`RECOMPUTING` while a
checkpointed block is recomputed (see ``in_recompute``).
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator, Protocol, runtime_checkable

import torch
from torch import nn

_state = threading.local()


def in_recompute() -> bool:
    """True while activation checkpointing is recomputing a forward."""
    return getattr(_state, "recomputing", False)


@contextlib.contextmanager
def recomputing() -> Iterator[None]:
    previous = in_recompute()
    _state.recomputing = True
    try:
        yield
    finally:
        _state.recomputing = previous


class FFN(nn.Module):
    """Base class: subclasses implement ``forward`` and optionally the hooks."""

    def forward(self, x_BTD: torch.Tensor, valid_BT: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:  # pragma: no cover
        raise NotImplementedError

    def reset_readouts(self) -> None:
        """Forget readout statistics gathered so far."""

    def readouts(self) -> dict[str, float]:
        """Per-layer statistics since the last reset (empty for a dense FFN)."""
        return {}

    def set_progress(self, step: int, total_steps: int) -> None:
        """Told the optimizer step before each training step (schedules like top-k warmup)."""


@runtime_checkable
class SelfOrganizing(Protocol):
    """An FFN whose non-gradient state the trainer updates once per optimizer step."""

    def som_statistics(self) -> list[torch.Tensor]:
        """Accumulated statistics to SUM all-reduce across data-parallel ranks (in place)."""

    def self_organize(self, step: int, total_steps: int) -> None:
        """Apply the accumulated statistics and clear them."""
