"""Periodic, best-keeping and final checkpoints (rank 0 writes)."""

from __future__ import annotations

from ..checkpoint import save_checkpoint
from .base import Callback


class CheckpointCallback(Callback):
    def __init__(self, every: int, keep_last: int):
        self.every, self.keep_last = every, keep_last
        self.last_saved = -1

    def save(self, trainer) -> None:
        if trainer.step == self.last_saved:
            return
        if trainer.dist.is_main:
            protect = (trainer.best_step,) if trainer.best_step >= 0 else ()
            save_checkpoint(trainer.run_dir, trainer.step, trainer.model, trainer.optimizer,
                            trainer.state_dict(), trainer.cfg, self.keep_last, protect)
        self.last_saved = trainer.step

    def on_step_end(self, trainer, metrics) -> None:
        if self.every > 0 and trainer.step % self.every == 0:
            self.save(trainer)

    def on_eval(self, trainer, metrics) -> None:
        if self.every == 0:
            self.save(trainer)

    def on_train_end(self, trainer, interrupted: bool) -> None:
        self.save(trainer)
