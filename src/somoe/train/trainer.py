"""The training loop: one optimizer step = all micro-batches, then hooks, then AdamW.

Batches are a pure function of (seed, step) (see ``somoe.data.batches``), the
LR is a pure function of the step, and RNG states go into checkpoints, so a
resumed run reproduces the uninterrupted one exactly on CPU in fp32. Under
DDP each rank takes its rows of the same global batch and the loss is
normalised by the global count of target tokens, so N processes follow the
same curve as one process with the same global batch.
"""

from __future__ import annotations

import contextlib
import json
import signal
import time
import weakref
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..config import ConfigError, RunConfig, save_config
from ..data import TrainBatches, eval_batches, prepare_data
from ..metrics import evaluate
from ..models import IGNORE_INDEX, build_model
from .callbacks import Callback, CheckpointCallback, MetricsLogger, SelfOrganizeCallback
from .checkpoint import (check_tokenizer, find_resumable, list_checkpoints, load_config_from, load_model_state,
                         load_training_state, tokenizer_digest)
from .config_changes import check_resume_config, precheck_resume_config, record_config_changes
from .dist import DistInfo, all_reduce_scalar, all_reduce_sum_, barrier, init_distributed
from .metrics_file import read_jsonl
from .nonfinite import TrainingDiverged, finite_step, optimizer_step_if
from .optim import build_optimizer, lr_at, set_lr
from .run_lock import acquire_run_lock, release_run_lock
from .runtime import autocast_factory, compile_model, resolve_device, resolve_precision, setup_backends
from .step import CompiledStep, check_compiled_step, prepare_frozen_experts


def read_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """``metrics`` with its device tensors as floats, read in one host transfer (a sync on a GPU)."""
    keys = [k for k, v in metrics.items() if isinstance(v, torch.Tensor)]
    if not keys:
        return metrics
    values = torch.stack([metrics[k].detach().float().reshape(()) for k in keys]).tolist()
    return {**metrics, **dict(zip(keys, values))}


class Trainer:
    def __init__(self, cfg: RunConfig, run_dir: str | Path, resume: str | None = None,
                 callbacks: list[Callback] | None = None, progress: bool = True, log=None,
                 allow_config_change: tuple[str, ...] = ()):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self._log = log
        self.device = resolve_device(cfg.train.device)
        self.dist: DistInfo = init_distributed(self.device.type)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
            torch.cuda.set_device(self.device)
        setup_backends(self.device, cfg.train.num_threads)
        self.precision = resolve_precision(cfg.train.precision, self.device)
        self.autocast = autocast_factory(self.precision, self.device)
        self._check_batch_split()
        precheck_resume_config(self.run_dir, resume, cfg, tuple(allow_config_change))
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # one writer per run folder; released at the end of fit(), or when a Trainer is dropped without it
        self._unlock = weakref.finalize(self, release_run_lock,
                                        acquire_run_lock(self.run_dir) if self.dist.is_main else None)
        resume_from = self._resume_point(resume)
        if resume_from is not None:  # before anything is written: never resume on other data or another model
            check_resume_config(self.run_dir, resume_from, cfg, tuple(allow_config_change))

        # rank 0 prepares (tokenizer, caches); the others then read what it wrote
        if self.dist.is_main:
            self.data = prepare_data(cfg, self.run_dir, log=self.log)
        barrier()
        if not self.dist.is_main:
            self.data = prepare_data(cfg, self.run_dir, log=lambda *_: None)
        if self.data.tokenizer.vocab_size > cfg.model.vocab_size:
            raise ConfigError(f"tokenizer has {self.data.tokenizer.vocab_size} tokens > model.vocab_size")
        self.tokenizer_sha256 = tokenizer_digest(self.data.tokenizer_path)
        if resume_from is not None:
            check_tokenizer(resume_from, self.data.tokenizer_path)
        self.batches = TrainBatches(self.data.train, cfg.data.mode, cfg.data.seq_len, cfg.train.seed,
                                    self.data.tokenizer.pad_id, self.data.tokenizer.eos_id)
        self.total_steps = cfg.train.max_steps or max(
            1, int(cfg.train.epochs * self.batches.steps_per_epoch(cfg.train.batch_size)))

        torch.manual_seed(cfg.train.seed)
        self.model = build_model(cfg.model, self.device)
        self.model.activation_checkpointing = cfg.train.activation_checkpointing
        self.step_compiled = cfg.train.compile == "step" or cfg.train.cuda_graphs
        if self.step_compiled:
            check_compiled_step(cfg.train, cfg.model, self.device, self.dist.world_size, self.precision)
        self.optimizer = build_optimizer(self.model, cfg.train, self.device.type, capturable=self.step_compiled)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")

        self.step, self.tokens_seen, self.best_val, self.best_step, self.elapsed = 0, 0, float("inf"), -1, 0.0
        self._log_mark = (0, 0.0)  # (step, elapsed) at the last train record: the compiled step's tok_per_s window
        # steps skipped for a non-finite loss or gradient norm: counted on the device, read at log/eval/save points
        self._bad_steps = torch.zeros((), dtype=torch.int64, device=self.device)
        self.bad_steps_seen = 0
        self.step_ok: torch.Tensor | None = None  # this step's flag, for the pre-optimizer-step hooks
        self.stop_reason: str | None = None  # None: finished; "signal", "diverged" or "error"
        self.resumed_from = resume_from
        if resume_from is not None:
            load_model_state(resume_from, self.model)
            self.load_state_dict(load_training_state(resume_from, self.optimizer))
            self.log(f"resumed from {resume_from} at step {self.step}")

        self.forward_model = self._wrap(self.model)
        self.compiled_step = (CompiledStep(self.model, self.optimizer, cfg.train, self.device, self.autocast,
                                           cfg.train.grad_accum, cuda_graphs=cfg.train.cuda_graphs)
                              if self.step_compiled else None)
        self.callbacks: list[Callback] = [SelfOrganizeCallback(), MetricsLogger(self.run_dir, progress),
                                          CheckpointCallback(cfg.train.ckpt_every, cfg.train.keep_last)]
        self.callbacks += list(callbacks or [])
        self._stop_signal: str | None = None
        self.extra_final_metrics: dict[str, float] = {}  # callbacks' end-of-run figures, in metrics.jsonl
        if self.dist.is_main:
            if resume_from is not None:
                record_config_changes(self.run_dir, load_config_from(resume_from), cfg, self.step, self.log)
            save_config(cfg, self.run_dir / "config.yaml")
            (self.run_dir / "params.json").write_text(json.dumps(self.model.param_counts()), encoding="utf-8")

    # --- setup helpers --------------------------------------------------------------
    def log(self, message: str) -> None:
        if not self.dist.is_main:
            return
        (self._log or tqdm.write)(message)

    def _check_batch_split(self) -> None:
        t = self.cfg.train
        if t.batch_size % (t.grad_accum * self.dist.world_size):
            raise ConfigError(
                f"train.batch_size={t.batch_size} must divide evenly into grad_accum={t.grad_accum} x "
                f"{self.dist.world_size} processes; change batch_size or grad_accum")
        self.micro_batch = t.batch_size // (t.grad_accum * self.dist.world_size)

    def _resume_point(self, resume: str | None) -> Path | None:
        if resume in (None, "", "never"):
            if list_checkpoints(self.run_dir):
                raise ConfigError(f"run folder {self.run_dir} already has checkpoints; pass --resume auto to "
                                  f"continue it or choose another --out")
            return None
        if resume == "auto":
            found = find_resumable(self.run_dir, log=self.log)
            if found is None:
                self.log(f"no checkpoint in {self.run_dir}: starting fresh")
            return found
        return Path(resume)

    def _wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        wrapped = model
        if self.cfg.train.compile is True:
            prepare_frozen_experts(model, self.device, self.autocast)
            wrapped = compile_model(model)
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            # buffers are not broadcast: frozen experts are regenerated identically on every rank
            # and SoME keys stay identical through the all-reduced self-organization
            wrapped = DDP(wrapped, device_ids=ids, broadcast_buffers=False)
        return wrapped

    # --- state for checkpoints ----------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "tokens_seen": self.tokens_seen, "best_val": self.best_val,
                "best_step": self.best_step, "elapsed": self.elapsed, "total_steps": self.total_steps,
                "world_size": self.dist.world_size, "bad_steps": self.bad_steps_seen,
                "tokenizer_sha256": self.tokenizer_sha256}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.best_val, self.best_step = state["best_val"], state.get("best_step", -1)
        self.elapsed = state.get("elapsed", 0.0)
        self.bad_steps_seen = state.get("bad_steps", 0)
        self._bad_steps.fill_(self.bad_steps_seen)
        self._log_mark = (self.step, self.elapsed)

    # --- the loop ------------------------------------------------------------------------
    def _micro_batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        rank_rows = self.micro_batch * self.cfg.train.grad_accum
        start = self.dist.rank * rank_rows
        return [self.batches.batch(self.step, self.cfg.train.batch_size, start + m * self.micro_batch,
                                   self.micro_batch) for m in range(self.cfg.train.grad_accum)]

    def train_step(self) -> dict[str, Any]:
        """One optimizer step over all micro-batches; returns the step's metrics."""
        if self.compiled_step is not None:
            return self._compiled_train_step()
        t0 = time.perf_counter()
        self.model.train()
        self.model.set_progress(self.step, self.total_steps)
        lr = lr_at(self.step, self.total_steps, self.cfg.train)
        set_lr(self.optimizer, lr)
        micro = self._micro_batches()
        counts = [int((y != IGNORE_INDEX).sum()) for _, y in micro]
        local_targets = sum(counts)
        global_targets = all_reduce_scalar(float(local_targets), self.device)
        # DDP averages gradients over ranks, so scale each rank's summed loss by world/global count
        scale = self.dist.world_size / max(global_targets, 1.0)
        loss_sum, aux_sum = 0.0, 0.0
        step_loss = torch.zeros((), device=self.device)  # the non-finite check's copy, kept on the device
        for m, (x, y) in enumerate(micro):
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            sync = m == len(micro) - 1 or not self.dist.enabled
            ctx = contextlib.nullcontext() if sync else self.forward_model.no_sync()
            with ctx:
                with self.autocast():
                    out = self.forward_model(x, y)
                n = counts[m]
                loss = out.ce_loss * (n * scale)
                if out.aux_loss is not None:
                    loss = loss + out.aux_loss / len(micro)
                    aux_sum += out.aux_loss.item() / len(micro)
                self.scaler.scale(loss).backward()
            step_loss += loss.detach().float()
            loss_sum += out.ce_loss.item() * n
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.model.parameters(), self.cfg.train.grad_clip if self.cfg.train.grad_clip > 0 else float("inf"))
        # fp16: inf gradients are the GradScaler's business (it skips the step and lowers the scale)
        self.step_ok = finite_step(step_loss, None if self.scaler.is_enabled() else grad_norm)
        if self.dist.enabled:  # one rank's bad loss skips the step on all of them (a collective, no host read)
            bad = (~self.step_ok).to(torch.float32)
            all_reduce_sum_([bad])
            self.step_ok = bad == 0
        self._bad_steps += ~self.step_ok
        for cb in self.callbacks:
            cb.pre_optim_step(self)
        if self.scaler.is_enabled():
            self.scaler.step(self.optimizer)
        else:
            optimizer_step_if(self.optimizer, self.step_ok)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        loss_global = all_reduce_scalar(loss_sum, self.device) / max(global_targets, 1.0)
        self.step += 1
        self.tokens_seen += int(global_targets)
        dt = time.perf_counter() - t0
        self.elapsed += dt
        tokens_in = self.cfg.train.batch_size * self.cfg.data.seq_len
        metrics = {"step": self.step, "tokens": self.tokens_seen, "loss": loss_global, "lr": lr,
                   "grad_norm": float(grad_norm), "tok_per_s": tokens_in / max(dt, 1e-9),
                   "elapsed": self.elapsed}
        if aux_sum:
            metrics["aux_loss"] = aux_sum
        return metrics

    def is_log_step(self, step: int) -> bool:
        """Whether ``step`` (counted after it ran) writes a train record."""
        return step % self.cfg.train.log_every == 0 or step == self.total_steps

    def _compiled_train_step(self) -> dict[str, Any]:
        """``train_step`` as one compiled function (train/step.py). The callbacks' ``pre_optim_step``
        hooks do not run: the self-organizing update is part of the step.

        The step's loss, gradient norm and aux loss stay on the device (0-d tensors, valid until the next
        step) except at log steps (:meth:`is_log_step`), where they are read together, once: a host read
        every step would keep the host from queuing the next step (a CUDA graph's replay) while the device
        runs this one. The non-finite check needs no read (counted on the device, read at log points).
        ``tok_per_s`` at a log step is the mean since the previous one, whose wall time includes waiting
        for the device's queue to drain."""
        t0 = time.perf_counter()
        self.model.train()
        self.model.set_progress(self.step, self.total_steps)
        lr = lr_at(self.step, self.total_steps, self.cfg.train)
        set_lr(self.optimizer, lr)  # the compiled step takes lr as data; the groups keep it for checkpoints
        micro = self._micro_batches()
        targets = sum(int((y != IGNORE_INDEX).sum()) for _, y in micro)  # host batches: no device read
        out = self.compiled_step(micro, self.step, self.total_steps, lr)
        self.step_ok = out["ok"]
        self._bad_steps += ~self.step_ok
        self.step += 1
        self.tokens_seen += targets
        metrics = {"step": self.step, "tokens": self.tokens_seen, "loss": out["ce_sum"] / max(targets, 1),
                   "lr": lr, "grad_norm": out["grad_norm"], "aux_loss": out["aux"]}
        tokens_in = self.cfg.train.batch_size * self.cfg.data.seq_len
        if self.is_log_step(self.step):
            metrics = read_metrics(metrics)  # waits for the device
            if not metrics["aux_loss"]:
                del metrics["aux_loss"]
        dt = time.perf_counter() - t0
        self.elapsed += dt
        tok_per_s = tokens_in / max(dt, 1e-9)
        if self.is_log_step(self.step):
            mark_step, mark_elapsed = self._log_mark
            if self.step > mark_step:
                tok_per_s = tokens_in * (self.step - mark_step) / max(self.elapsed - mark_elapsed, 1e-9)
            self._log_mark = (self.step, self.elapsed)
        metrics.update(tok_per_s=tok_per_s, elapsed=self.elapsed)
        return metrics

    def check_bad_steps(self) -> None:
        """Read the device's bad-step count (a host sync: called where the loop logs, evaluates or saves);
        warn about new ones and raise TrainingDiverged past ``train.max_bad_steps``."""
        count = int(self._bad_steps)
        if count == self.bad_steps_seen:
            return
        self.log(f"warning: {count - self.bad_steps_seen} step(s) up to step {self.step} had a non-finite loss or "
                 f"gradient norm and were skipped ({count} in all, train.max_bad_steps={self.cfg.train.max_bad_steps})")
        self.bad_steps_seen = count
        if count > self.cfg.train.max_bad_steps:
            best = (f"the best checkpoint (step {self.best_step}, val loss {self.best_val:.4f}) is kept"
                    if self.best_step >= 0 else "no checkpoint was written after the divergence")
            raise TrainingDiverged(f"training diverged: {count} steps had a non-finite loss or gradient norm "
                                   f"(train.max_bad_steps={self.cfg.train.max_bad_steps}) by step {self.step}; {best}; "
                                   f"lower train.lr or keep train.grad_clip on")

    def run_eval(self) -> dict[str, Any]:
        t = self.cfg.train
        # the eval set depends neither on the number of processes nor on grad_accum: every run of a
        # config is scored on the same windows
        batch = t.eval_batch_size or t.batch_size
        windows = eval_batches(self.data.val, self.cfg.data.seq_len, batch, t.eval_batches,
                               pad_id=self.data.tokenizer.pad_id)
        result = evaluate(self.model, windows, self.data.tokenizer.token_byte_lengths(), self.device,
                          self.autocast, rank=self.dist.rank, world_size=self.dist.world_size)
        metrics = {"step": self.step, "tokens": self.tokens_seen, "elapsed": self.elapsed,
                   "val_loss": result.loss, "val_ppl": result.ppl, "val_bpb": result.bpb,
                   "val_tokens": result.tokens, "val_bytes": result.bytes, **result.readouts}
        if result.loss < self.best_val:
            self.best_val, self.best_step = result.loss, self.step
        for cb in self.callbacks:
            cb.on_eval(self, metrics)
        return metrics

    def middle_layer_readout(self, metrics: dict[str, Any]) -> dict[str, float]:
        """Readouts of the middle layer (seed 000 reports that one), if the FFN has any."""
        prefix = f"layer{self.cfg.model.n_layers // 2}/"
        mid = {k[len(prefix):]: v for k, v in metrics.items() if k.startswith(prefix)}
        return mid if "usage_gini" in mid else {}

    def _on_signal(self, signum, frame) -> None:
        self._stop_signal = signal.Signals(signum).name

    def fit(self) -> dict[str, Any]:
        """Train to ``total_steps`` (or the time limit / a signal); returns the last eval metrics."""
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        for cb in self.callbacks:
            cb.on_train_start(self)
        t = self.cfg.train
        last_eval: dict[str, Any] = {}
        start = time.perf_counter()
        try:
            while self.step < self.total_steps and self._stop_signal is None:
                metrics = self.train_step()
                if self.is_log_step(self.step):
                    self.check_bad_steps()  # checkpoint saves check too
                for cb in self.callbacks:
                    cb.on_step_end(self, metrics)
                out_of_time = t.max_minutes > 0 and time.perf_counter() - start > 60 * t.max_minutes
                if self.step == self.total_steps or out_of_time:
                    break
                if t.eval_every > 0 and self.step % t.eval_every == 0:
                    self.check_bad_steps()
                    last_eval = self.run_eval()
            self.check_bad_steps()
            if self._stop_signal is not None:
                self.stop_reason = "signal"
                self.log(f"{self._stop_signal} received: saving a checkpoint at step {self.step} and stopping")
            elif self._final_eval_done():
                self.log(f"run already finished at step {self.step}: nothing to do")
            else:
                last_eval = self.run_eval()
        except TrainingDiverged:
            self.stop_reason = "diverged"
            raise
        except BaseException:
            self.stop_reason = "error"
            raise
        finally:
            for cb in self.callbacks:
                cb.on_train_end(self, interrupted=self._stop_signal is not None)
            if self.extra_final_metrics and self.dist.is_main:
                with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as fh:
                    fh.write(json.dumps({"kind": "final", "step": self.step, **self.extra_final_metrics}) + "\n")
            for s, handler in previous.items():
                signal.signal(s, handler)
            self._unlock()
        return last_eval

    @property
    def stop_signal(self) -> str | None:
        """SIGINT/SIGTERM when a signal stopped the run (after its checkpoint), else None."""
        return self._stop_signal

    def _final_eval_done(self) -> bool:
        """A resumed run that had already finished has its eval at this step in metrics.jsonl."""
        records = read_jsonl(self.run_dir / "metrics.jsonl", log=self.log) if self.dist.is_main else []
        done = any(r.get("kind") == "eval" and r.get("step") == self.step for r in records)
        return all_reduce_scalar(float(done), self.device) > 0  # rank 0 decides for all
