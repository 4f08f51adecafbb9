"""The whole training step as one compiled function (``train.compile=step``), optionally replayed as a
CUDA graph (``train.cuda_graphs=true``).

One call runs, for every micro-batch, the forward (routing tallies and SoME statistics included) and
its backward (``torch.autograd.grad``), then gradient clipping, the non-finite check, the
self-organizing key update and AdamW (``torch.optim.adamw.adamw``, foreach and capturable: the
learning rate is a device tensor). ``torch.compile(fullgraph=True)`` traces it whole, so the step
is one graph with no graph break.

Everything that changes from one step to the next is tensor data in fixed device buffers, written
before the call from one pinned host vector: the learning rate, each micro-batch's loss weight, the
rule rates of every SoME layer and whether its update is scheduled. ``set_progress`` (top-k and the
MoE noise start as device flags) runs before it; SoME's host mirror of its update count and its next
query-sample uniforms after it. Nothing inside reads a tensor on the host, so one graph serves every
step (warm-up rules, top-k ramp, noise start), and a CUDA graph can replay it.

A step with a non-finite loss or gradient norm changes nothing (parameters, AdamW moments and step
counts, key-rule state), decided on the device with ``torch.where``, as the eager trainer does.
Eager and compiled steps agree to float rounding (tests/train/test_compiled_step.py); the
checkpoint format is the same, so a run can resume in either mode.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.optim.adamw import adamw

from ..config import ConfigError, TrainConfig
from ..models import IGNORE_INDEX
from ..models.dispatch import grouped_mm_sync_free
from .nonfinite import finite_step
from .runtime import RECOMPILE_LIMIT

CUDA_GRAPH_WARMUP = 2  # steps run uncaptured (compiling, allocating) before the capture
# dynamo settings of the traced step, where this torch has them: ``trace_autograd_ops`` (torch >= 2.11) lets
# it trace ``torch.autograd.grad`` (without it the step does not trace: scripts/gpu_preflight.py says so)
TRACE_SETTINGS = {k: True for k in ("trace_autograd_ops", "specialize_float") if hasattr(torch._dynamo.config, k)}


def check_compiled_step(cfg: TrainConfig, model_cfg, device: torch.device, world_size: int, precision: str) -> None:
    """One-line errors for settings the compiled step does not take."""
    if cfg.cuda_graphs and device.type != "cuda":
        raise ConfigError(f"train.cuda_graphs=true needs a CUDA device (this run is on {device.type}); "
                          f"drop train.cuda_graphs or set train.device=cuda on a GPU machine")
    if cfg.cuda_graphs and precision != "bf16" and model_cfg.ffn != "dense":
        raise ConfigError(f"train.cuda_graphs=true with routed experts needs train.precision=bf16 (the grouped "
                          f"matmul without a host sync), not {precision}")
    if cfg.cuda_graphs and model_cfg.ffn != "dense" and not grouped_mm_sync_free(device):
        major, minor = torch.cuda.get_device_capability(device)
        raise ConfigError(f"train.cuda_graphs=true with routed experts needs a GPU whose grouped matmul is sync-free "
                          f"(compute capability 9.x or 10.x; this one is {major}.{minor}, where torch reads the "
                          f"expert offsets on the host); use train.compile=step without cuda_graphs")
    problems = [(world_size > 1, "runs on one process; use train.compile=true under torchrun"),
                (precision == "fp16", "takes no fp16 GradScaler; use train.precision=bf16 or fp32"),
                (cfg.activation_checkpointing, "does not combine with train.activation_checkpointing=true; drop one"),
                (model_cfg.ffn == "some" and model_cfg.some.update_token_fraction < 1.0,
                 "needs model.some.update_token_fraction=1 (the token sample comes from a host generator)")]
    for bad, why in problems:
        if bad:
            raise ConfigError(f"train.compile=step {why}")


def staged_for(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` ready for a non-blocking copy to ``device``: a host tensor bound for CUDA is pinned (an
    asynchronous copy needs page-locked memory); a tensor already on a device is returned as it is,
    because torch refuses to pin anything but host memory (callers such as ``somoe bench compile``
    hand the step batches that already live on the GPU)."""
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory()
    return t


def init_adamw_state(optimizer: torch.optim.AdamW) -> None:
    """AdamW's per-parameter state as its first ``step()`` would create it (capturable: a float32 step
    count on the parameter's device), for parameters that have none yet (a resume loaded the others)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not optimizer.state[p]:
                optimizer.state[p] = {"step": torch.zeros((), dtype=torch.float32, device=p.device),
                                      "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                                      "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}


def prepare_frozen_experts(model, device: torch.device, autocast: Callable[[], Any]) -> None:
    """Frozen experts' copies in the run's compute dtype, made eagerly before a compiled forward traces
    them (traced code reads a copy but does not create one: models/ffn/some_frozen.py)."""
    probe = torch.empty(0, device=device)
    with autocast():
        for ffn in model.ffns():
            if hasattr(ffn, "prepare_compute"):
                ffn.prepare_compute(probe)


class CompiledStep:
    """``step(micro_batches, step, total_steps, lr)`` -> device tensors ``ce_sum`` (CE times counted
    targets, summed), ``aux``, ``grad_norm`` and ``ok``; see the module docstring."""

    def __init__(self, model, optimizer: torch.optim.AdamW, cfg: TrainConfig, device: torch.device,
                 autocast: Callable[[], Any], grad_accum: int, backend: Any = None, cuda_graphs: bool = False,
                 fullgraph: bool = True):
        self.model, self.optimizer, self.cfg, self.device, self.autocast = model, optimizer, cfg, device, autocast
        self.micro = grad_accum
        self.layers = model.self_organizing_layers()
        for layer in self.layers:
            layer.gather_always = True  # one graph: unscheduled steps gather too, and their statistics are dropped
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        init_adamw_state(optimizer)
        prepare_frozen_experts(model, device, autocast)
        # what the traced update reads, fixed here: reading the param groups would guard on their lr
        self._groups = [_AdamWGroup(group, optimizer.state, self.params) for group in optimizer.param_groups
                        if group["params"]]
        # the step's scalars, one host-to-device copy: lr, loss weight per micro-batch, rates and schedule per layer
        self._scalars = torch.zeros(1 + self.micro + 5 * len(self.layers), device=device)
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        self._fn = torch.compile(self._step, fullgraph=fullgraph, backend=backend or cfg.compile_backend)
        self._graphed = _CudaGraphed(self._traced) if cuda_graphs else None

    # --- host side -------------------------------------------------------------------------------
    def __call__(self, micro: list[tuple[torch.Tensor, torch.Tensor]], step: int, total_steps: int,
                 lr: float) -> dict[str, torch.Tensor]:
        counts = [float((y != IGNORE_INDEX).sum()) for _, y in micro]  # host batches: no device read
        scale = 1.0 / max(sum(counts), 1.0)
        host = [lr] + [n * scale for n in counts]
        scheduled = []
        for layer in self.layers:
            r = layer.rates(step, total_steps)
            host += [r.alpha, r.gamma, r.beta, r.delta]
            scheduled.append(step % layer.cfg.update_every == 0)
        host += [float(s) for s in scheduled]
        scalars = torch.tensor(host, dtype=torch.float32)
        xs = torch.stack([x for x, _ in micro])
        ys = torch.stack([y for _, y in micro])
        counts_t = torch.tensor(counts, dtype=torch.float32)
        scalars, xs, ys, counts_t = (staged_for(t, self.device) for t in (scalars, xs, ys, counts_t))
        self._scalars.copy_(scalars, non_blocking=True)
        inputs = [t.to(self.device, non_blocking=True) for t in (xs, ys, counts_t)]
        out = self._graphed(*inputs) if self._graphed is not None else self._traced(*inputs)
        for layer, due in zip(self.layers, scheduled):
            if due:
                layer.count_update_on_host()
        return out

    def _traced(self, xs: torch.Tensor, ys: torch.Tensor, counts: torch.Tensor) -> dict[str, torch.Tensor]:
        # autograd.grad inside the graph; Python floats (config rates, coefficients: constant over a run) as
        # constants, so that inductor does not restart the trace to turn them into tensors (a second compile)
        with torch._dynamo.config.patch(**TRACE_SETTINGS):
            return self._fn(xs, ys, counts, self._scalars)

    # --- the traced step ---------------------------------------------------------------------------
    def _step(self, xs: torch.Tensor, ys: torch.Tensor, counts: torch.Tensor, scalars: torch.Tensor
              ) -> dict[str, torch.Tensor]:
        M, L = self.micro, len(self.layers)
        lr, weights = scalars[0], scalars[1:1 + M]
        rates = scalars[1 + M:1 + M + 4 * L].view(L, 4)
        scheduled = scalars[1 + M + 4 * L:] > 0
        grads = None
        ce_sum = torch.zeros((), device=xs.device)
        aux_sum = torch.zeros((), device=xs.device)
        step_loss = torch.zeros((), device=xs.device)
        for m in range(M):
            with self.autocast():
                out = self.model(xs[m], ys[m])
            loss = out.ce_loss * weights[m]
            if out.aux_loss is not None:
                loss = loss + out.aux_loss / M
                aux_sum = aux_sum + out.aux_loss.detach().float() / M
            new = torch.autograd.grad(loss, self.params, allow_unused=True)
            new = [torch.zeros_like(p) if g is None else g for p, g in zip(self.params, new)]
            grads = new if grads is None else torch._foreach_add(grads, new)
            step_loss = step_loss + loss.detach().float()
            ce_sum = ce_sum + out.ce_loss.detach().float() * counts[m]
        with torch.no_grad():
            grad_norm = torch.nn.utils.get_total_norm(grads)
            if self.cfg.grad_clip > 0:  # clip_grad_norm_'s rule
                torch._foreach_mul_(grads, torch.clamp(self.cfg.grad_clip / (grad_norm + 1e-6), max=1.0))
            ok = finite_step(step_loss, grad_norm)
            for i, layer in enumerate(self.layers):  # before AdamW, as the eager trainer's hook
                layer.self_organize_traced(rates[i], scheduled[i], ok)
            self._adamw(grads, lr, ok)
        return {"ce_sum": ce_sum, "aux": aux_sum, "grad_norm": grad_norm, "ok": ok}

    def _adamw(self, grads: list[torch.Tensor], lr: torch.Tensor, ok: torch.Tensor) -> None:
        """torch's AdamW update per parameter group; undone where ``ok`` is false."""
        for g in self._groups:
            touched = [*g.params, *g.exp_avgs, *g.exp_avg_sqs, *g.steps]
            before = [t.clone() for t in touched]
            adamw(g.params, [grads[i] for i in g.grad_index], g.exp_avgs, g.exp_avg_sqs, [], g.steps,
                  foreach=True, capturable=True, amsgrad=False, beta1=g.betas[0], beta2=g.betas[1], lr=lr,
                  weight_decay=g.weight_decay, eps=g.eps, maximize=False)
            for t, old in zip(touched, before):
                t.copy_(torch.where(ok, t, old))


class _AdamWGroup:
    """One parameter group's tensors and constant hyperparameters (the learning rate comes as data)."""

    def __init__(self, group: dict, state: dict, all_params: list[torch.Tensor]):
        self.params = list(group["params"])
        self.grad_index = [next(i for i, q in enumerate(all_params) if q is p) for p in self.params]
        self.exp_avgs = [state[p]["exp_avg"] for p in self.params]
        self.exp_avg_sqs = [state[p]["exp_avg_sq"] for p in self.params]
        self.steps = [state[p]["step"] for p in self.params]
        self.betas, self.weight_decay, self.eps = tuple(group["betas"]), group["weight_decay"], group["eps"]


class _CudaGraphed:
    """``fn(*inputs)`` replayed as one CUDA graph: the first CUDA_GRAPH_WARMUP calls run it as they are
    (on a side stream: compiling, allocating), the next captures it on copies of its inputs, and every
    call then copies its inputs into those and replays. Each call is one real step."""

    def __init__(self, fn: Callable[..., dict[str, torch.Tensor]]):
        self.fn, self.calls = fn, 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_in: list[torch.Tensor] = []
        self.static_out: dict[str, torch.Tensor] = {}

    def __call__(self, *inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.graph is None and self.calls < CUDA_GRAPH_WARMUP:
            self.calls += 1
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = self.fn(*inputs)
            torch.cuda.current_stream().wait_stream(side)
            return out
        if self.graph is None:
            self.static_in = [t.clone() for t in inputs]
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.static_out = self.fn(*self.static_in)
        for static, t in zip(self.static_in, inputs):
            static.copy_(t, non_blocking=True)
        self.graph.replay()
        return self.static_out

