"""Periodic, best-keeping and final checkpoints (rank 0 writes).

Whatever the eval and checkpoint cadence, the checkpoint with the best validation loss so far
is on disk and named by ``checkpoints/best.json``: an eval that improves on the best saves
its step (pruning never removes it). An eval after a save at the same step refreshes that
checkpoint's trainer state, so its best step and loss are never stale. Nothing is saved
after a divergence or an error: the last good checkpoints stay the newest.
"""

from __future__ import annotations

from ..checkpoint import prune_checkpoints, refresh_trainer_state, save_checkpoint, write_best
from .base import Callback


class CheckpointCallback(Callback):
    def __init__(self, every: int, keep_last: int):
        self.every, self.keep_last = every, keep_last
        self.last_saved = -1
        self.last_path = None

    def on_train_start(self, trainer) -> None:
        resumed = trainer.resumed_from
        if resumed is not None and resumed.parent.resolve() == (trainer.run_dir / "checkpoints").resolve():
            self.last_saved, self.last_path = trainer.step, resumed  # on disk already: refreshed, not rewritten

    def save(self, trainer) -> None:
        trainer.check_bad_steps()  # never publish a step taken after too many skipped ones
        if trainer.dist.is_main:
            if trainer.step == self.last_saved:
                refresh_trainer_state(self.last_path, trainer.state_dict())
            else:
                protect = (trainer.best_step,) if trainer.best_step >= 0 else ()
                self.last_path = save_checkpoint(trainer.run_dir, trainer.step, trainer.model, trainer.optimizer,
                                                 trainer.state_dict(), trainer.cfg, self.keep_last, protect)
            if trainer.best_step == trainer.step:
                write_best(trainer.run_dir, trainer.step, trainer.best_val)
                if self.keep_last > 0:  # the former best is an ordinary checkpoint now
                    prune_checkpoints(trainer.run_dir / "checkpoints", self.keep_last)
        self.last_saved = trainer.step

    def on_step_end(self, trainer, metrics) -> None:
        if self.every > 0 and trainer.step % self.every == 0:
            self.save(trainer)

    def on_eval(self, trainer, metrics) -> None:
        if self.every == 0 or trainer.best_step == trainer.step:
            self.save(trainer)

    def on_train_end(self, trainer, interrupted: bool) -> None:
        if trainer.stop_reason in (None, "signal"):
            self.save(trainer)
