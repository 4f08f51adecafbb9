"""Applies SoME's non-gradient key updates once per optimizer step.

Runs after every micro-batch's backward (so gradient accumulation counts all
of them once) and SUM-all-reduces the statistics across data-parallel ranks
first, so every rank applies the same update and keys stay identical. At the
end of training it checks that claim: the largest difference of any
self-organized buffer between ranks is logged as ``som_rank_divergence``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..dist import all_reduce_sum_
from ..nonfinite import restored_unless
from .base import Callback


# The state the rules move. Left out: the per-step statistics (cleared in any case), and the update
# counter with what derives from it (the layer mirrors it on the host and seeds its sample table by it).
RULE_STATE = ("key_store", "key_route", "usage_ema", "query_mean_ema", "query_center", "dormant_streak",
              "key_drift", "log_tau", "selection_bias")


def _self_organized_state(layer) -> list[torch.Tensor]:
    """The layer's tensors among RULE_STATE that are buffers (a trained log_tau is the optimizer's)."""
    buffers = dict(layer.named_buffers(recurse=False))
    return [buffers[name] for name in RULE_STATE if name in buffers]


class SelfOrganizeCallback(Callback):
    def pre_optim_step(self, trainer) -> None:
        layers = trainer.model.self_organizing_layers()
        if not layers:
            return
        all_reduce_sum_([t for layer in layers for t in layer.som_statistics()])
        for layer in layers:
            # a step skipped for a non-finite loss leaves the keys as they were: its statistics came
            # from that forward (decided on the device, like the optimizer's skip)
            with restored_unless(trainer.step_ok, _self_organized_state(layer)):
                layer.self_organize(trainer.step, trainer.total_steps)

    def on_train_end(self, trainer, interrupted: bool) -> None:
        layers = trainer.model.self_organizing_layers()
        if not layers or not trainer.dist.enabled:
            return
        # keys, usage and friends; frozen experts are skipped (regenerated from a seed, checked by hash)
        state = torch.cat([b.detach().double().reshape(-1) for layer in layers
                           for name, b in layer.named_buffers()
                           if b.is_floating_point() and not name.startswith("expert_")])
        high, low = state.clone(), state.clone()
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        divergence = (high - low).abs().max().item()
        trainer.log(f"self-organized state across {trainer.dist.world_size} ranks: max difference {divergence:.3g}")
        trainer.extra_final_metrics["som_rank_divergence"] = divergence
