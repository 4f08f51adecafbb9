"""Applies SoME's non-gradient key updates once per optimizer step.

Runs after every micro-batch's backward (so gradient accumulation counts all
of them once) and SUM-all-reduces the statistics across data-parallel ranks
first, so every rank applies the same update and keys stay identical.
"""

from __future__ import annotations

from ..dist import all_reduce_sum_
from .base import Callback


class SelfOrganizeCallback(Callback):
    def pre_optim_step(self, trainer) -> None:
        layers = trainer.model.self_organizing_layers()
        if not layers:
            return
        all_reduce_sum_([t for layer in layers for t in layer.som_statistics()])
        for layer in layers:
            layer.self_organize(trainer.step, trainer.total_steps)
