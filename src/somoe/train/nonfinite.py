"""Steps with a non-finite loss or gradient norm are skipped, decided on the device.

The flag ``ok`` is a 0-d bool tensor computed where the loss lives; nothing here reads it
on the host on a GPU: the fused AdamW kernel takes it as ``found_inf`` (the mechanism
GradScaler uses: the kernel leaves parameters and moments alone and the step count is
reverted), and buffers are restored with ``torch.where``. The trainer counts bad steps on
the device and reads the count only where it logs, evaluates or saves.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


class TrainingDiverged(RuntimeError):
    """Too many steps had a non-finite loss or gradient norm (``train.max_bad_steps``)."""


def finite_step(loss: torch.Tensor, grad_norm: torch.Tensor | None) -> torch.Tensor:
    """A 0-d bool tensor: the step's loss (and gradient norm, when given) are finite."""
    ok = torch.isfinite(loss.detach()).all()
    if grad_norm is not None:
        ok = ok & torch.isfinite(grad_norm.detach()).all()
    return ok


def optimizer_step_if(optimizer: torch.optim.Optimizer, ok: torch.Tensor) -> None:
    """``optimizer.step()`` when ``ok``, a no-op otherwise (moments and step counts untouched)."""
    if optimizer.defaults.get("fused"):
        optimizer.found_inf = (~ok).to(torch.float32)
        optimizer.grad_scale = None
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf, optimizer.grad_scale
    elif bool(ok):  # the unfused optimizers take no flag; on the CPU, where they run, the read costs nothing
        optimizer.step()


@contextmanager
def restored_unless(ok: torch.Tensor | None, tensors: list[torch.Tensor]):
    """Changes made inside the block to ``tensors`` (in place) are undone where ``ok`` is false (kept if None)."""
    if ok is None:
        yield
        return
    saved = [t.clone() for t in tensors]
    yield
    for t, old in zip(tensors, saved):
        t.copy_(torch.where(ok, t, old))
