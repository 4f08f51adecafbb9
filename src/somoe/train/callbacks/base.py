"""Trainer callbacks: one small class per concern (logging, checkpoints, self-organization)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..trainer import Trainer


class Callback:
    """Hooks called by the Trainer; every hook is optional."""

    def on_train_start(self, trainer: "Trainer") -> None: ...

    def pre_optim_step(self, trainer: "Trainer") -> None:
        """After all micro-batches' backward, before the optimizer step."""

    def on_step_end(self, trainer: "Trainer", metrics: dict[str, Any]) -> None: ...

    def on_eval(self, trainer: "Trainer", metrics: dict[str, Any]) -> None: ...

    def on_train_end(self, trainer: "Trainer", interrupted: bool) -> None: ...
