"""metrics.jsonl, optional TensorBoard events, and the progress bar (rank 0 only)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tqdm.auto import tqdm

from ..metrics_file import read_jsonl
from .base import Callback


def truncate_metrics(path: Path, after_step: int, log=print) -> None:
    """Drop records past ``after_step`` (a resumed run rewrites them, no duplicates) and a torn last line."""
    if not path.is_file():
        return
    kept = [record for record in read_jsonl(path, log=log) if record.get("step", 0) <= after_step]
    path.write_text("".join(json.dumps(record) + "\n" for record in kept), encoding="utf-8")


class MetricsLogger(Callback):
    def __init__(self, run_dir: Path, progress: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.progress = progress
        self.bar = None
        self.tb = None

    def on_train_start(self, trainer) -> None:
        if not trainer.dist.is_main:
            return
        truncate_metrics(self.path, trainer.step, log=trainer.log)
        try:  # TensorBoard is optional
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.path.parent / "tensorboard"))
        except Exception:
            self.tb = None
        if self.progress:
            self.bar = tqdm(total=trainer.total_steps, initial=trainer.step, desc=trainer.cfg.name,
                            unit="step", dynamic_ncols=True, file=sys.stderr, mininterval=1.0)

    def _write(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step", "kind"):
                    self.tb.add_scalar(f"{record['kind']}/{key}", value, record["step"])

    def on_step_end(self, trainer, metrics) -> None:
        if not trainer.dist.is_main:
            return
        if self.bar is not None:
            self.bar.update(trainer.step - self.bar.n)
            if isinstance(metrics["loss"], float):  # the compiled step reads its loss at log steps only
                self.bar.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{metrics['tok_per_s']:.0f}", refresh=False)
        if trainer.is_log_step(trainer.step):
            self._write({"kind": "train", **metrics})

    def on_eval(self, trainer, metrics) -> None:
        if not trainer.dist.is_main:
            return
        self._write({"kind": "eval", **metrics})
        message = (f"step {metrics['step']}: val loss {metrics['val_loss']:.4f} | ppl {metrics['val_ppl']:.2f} "
                   f"| bpb {metrics['val_bpb']:.4f}")
        mid = trainer.middle_layer_readout(metrics)
        if mid:
            message += f" | mid-layer gini {mid['usage_gini']:.3f} entropy {mid['usage_entropy_bits']:.3f} bits"
        trainer.log(message)

    def on_train_end(self, trainer, interrupted: bool) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
