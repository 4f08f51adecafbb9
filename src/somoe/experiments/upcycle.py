"""Dense -> MoE upcycling with verified functional equivalence (seed 004).

Embeddings, attention, norms and head are copied; every expert of layer i
becomes a copy of the dense FFN of layer i; the router (and the noise
projection) is zeroed. With all logits equal the kept gates are uniform
(1/k each) and the k experts compute the same thing, so the MoE computes the
dense model's function. :func:`verify` checks this on a frozen probe batch in
fp32: the per-sequence max |logit_dense - logit_moe| must stay below a
tolerance (1e-4), or the transfer is broken.

The result is written as an ordinary run folder with one checkpoint
``step-00000000`` (no optimizer state), so ``somoe eval``/``generate`` work on
it and ``somoe train --config DIR/config.yaml --out DIR --resume auto``
continues training it.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from ..config import ConfigError, RunConfig, apply_overrides, from_dict, save_config, to_dict
from ..models import LM, build_model
from ..models.ffn.dense import DenseFFN
from ..models.ffn.moe import MoELayer
from ..train.checkpoint import CheckpointError, list_checkpoints, save_checkpoint

TOLERANCE = 1e-4  # fp32 max |logit difference| the issue and seed 004 accept


def moe_config(dense_cfg: RunConfig, num_experts: int | None = None, top_k: int | None = None,
               overrides: list[str] | None = None) -> RunConfig:
    """The dense run's config with ``model.ffn=moe``; experts as wide as the dense FFN."""
    if dense_cfg.model.ffn != "dense":
        raise ConfigError(f"upcycling needs a dense run, this one has model.ffn={dense_cfg.model.ffn}; "
                          f"pass a run trained with model.ffn=dense")
    data = to_dict(dense_cfg)
    moe = data["model"]["moe"]
    data["model"]["ffn"] = "moe"
    moe["d_ffn"] = 0  # = the dense FFN width
    if num_experts is not None:
        moe["num_experts"] = num_experts
    if top_k is not None:
        moe["top_k"] = top_k
    cfg = from_dict(RunConfig, apply_overrides(data, list(overrides or [])))
    check_upcyclable(dense_cfg, cfg)
    return cfg


def check_upcyclable(dense_cfg: RunConfig, cfg: RunConfig) -> None:
    """ConfigError unless ``cfg`` is an MoE whose experts can be exact copies of ``dense_cfg``'s FFN."""
    dense_width = dense_cfg.model.ffn_hidden
    if (cfg.model.moe.d_ffn or cfg.model.ffn_hidden) != dense_width:
        raise ConfigError(f"model.moe.d_ffn={cfg.model.moe.d_ffn} differs from the dense FFN width {dense_width}; "
                          f"upcycled experts are copies of the dense FFN, leave model.moe.d_ffn at 0")
    if cfg.model.moe.capacity_factor > 0:
        raise ConfigError("upcycling with model.moe.capacity_factor > 0 drops slots, so the MoE would not equal "
                          "the dense model; upcycle dropless (capacity_factor=0) and set it when training on")
    same = {k: v for k, v in to_dict(cfg.model).items() if k not in ("ffn", "moe")}
    if same != {k: v for k, v in to_dict(dense_cfg.model).items() if k not in ("ffn", "moe")}:
        raise ConfigError("overrides may change model.moe.* only: the backbone must stay the dense run's")


@torch.no_grad()
def copy_dense_into_experts(moe: MoELayer, dense: DenseFFN) -> None:
    """Every expert := the dense FFN (``nn.Linear`` stores W^T); router and noise := 0."""
    E = moe.cfg.num_experts
    if dense.fc_in.weight.shape[0] != moe.d_ffn or dense.swiglu != moe.swiglu:
        raise ConfigError(f"layer {moe.layer_idx}: the dense FFN (width {dense.fc_in.weight.shape[0]}, swiglu "
                          f"{dense.swiglu}) does not fit the experts (width {moe.d_ffn}, swiglu {moe.swiglu})")
    moe.expert_w1.copy_(dense.fc_in.weight.t().expand(E, -1, -1))
    moe.expert_w2.copy_(dense.fc_out.weight.t().expand(E, -1, -1))
    if moe.expert_wg is not None:
        moe.expert_wg.copy_(dense.fc_gate.weight.t().expand(E, -1, -1))
    for mine, theirs in ((moe.expert_b1, dense.fc_in.bias), (moe.expert_b2, dense.fc_out.bias)):
        if (mine is None) != (theirs is None):
            raise ConfigError(f"layer {moe.layer_idx}: dense and expert biases differ (model.bias)")
        if mine is not None:
            mine.copy_(theirs.expand(E, -1))
    moe.router.weight.zero_()
    if moe.noise is not None:
        moe.noise.weight.zero_()


@torch.no_grad()
def upcycle_model(dense: LM, moe_cfg: RunConfig) -> LM:
    """A new MoE LM on the dense model's device holding the dense model's function."""
    device = next(dense.parameters()).device
    moe = build_model(moe_cfg.model, device)
    dense_state = dense.state_dict()
    state = moe.state_dict()
    backbone = {k for k in state if ".ffn." not in k}
    missing = backbone ^ {k for k in dense_state if ".ffn." not in k}
    if missing:
        raise ConfigError(f"dense and MoE backbones differ in {sorted(missing)[:3]}; upcycle the run's own config")
    for key in backbone:
        state[key] = dense_state[key]
    moe.load_state_dict(state)
    for moe_ffn, dense_ffn in zip(moe.ffns(), dense.ffns()):
        copy_dense_into_experts(moe_ffn, dense_ffn)
    moe.train(dense.training)
    return moe


@contextlib.contextmanager
def exact_fp32() -> Iterator[None]:
    """Full-precision fp32 matmuls (no TF32 on CUDA) while comparing logits."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.get_float32_matmul_precision())
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
        torch.set_float32_matmul_precision(saved[2])


@dataclass
class Verification:
    per_sequence: list[float]  # max |logit_dense - logit_moe| of each probe sequence
    tolerance: float

    @property
    def max_diff(self) -> float:
        return max(self.per_sequence) if self.per_sequence else 0.0

    @property
    def passed(self) -> bool:
        return bool(self.per_sequence) and self.max_diff < self.tolerance

    def lines(self) -> list[str]:
        out = [f"[verification] per-sequence max |logit_dense - logit_moe| (fp32, eval mode, "
               f"tolerance {self.tolerance:.0e}):"]
        out += [f"  seq {i}: {d:.2e}  {'OK' if d < self.tolerance else 'FAIL'}" for i, d in enumerate(self.per_sequence)]
        verdict = "PASSED: functional equivalence confirmed" if self.passed else "FAILED: the MoE is not the dense model"
        out.append(f"  overall max {self.max_diff:.2e}: {verdict}")
        return out

    def as_dict(self) -> dict:
        return {"per_sequence": self.per_sequence, "max_diff": self.max_diff, "tolerance": self.tolerance,
                "passed": self.passed}


def expert_groups(num_experts: int, top_k: int) -> list[list[int]]:
    """Groups of k distinct experts covering all E: forcing each group in turn exercises every expert."""
    return [[(g * top_k + j) % num_experts for j in range(top_k)] for g in range(math.ceil(num_experts / top_k))]


@contextlib.contextmanager
def forced_experts(moe: LM, group: list[int] | None) -> Iterator[None]:
    """Every MoE layer routes to ``group`` (equal offsets keep the kept gates uniform); None: the router."""
    layers = [f for f in moe.ffns() if isinstance(f, MoELayer)]
    if group is not None:
        for layer in layers:
            offset = torch.zeros(layer.cfg.num_experts)
            offset[group] = 1e4
            layer.logit_offset = offset
    try:
        yield
    finally:
        for layer in layers:
            layer.logit_offset = None


@torch.no_grad()
def verify(dense: LM, moe: LM, probe_BT: torch.Tensor, tolerance: float = TOLERANCE) -> Verification:
    """Compare both models' logits on ``probe_BT`` in fp32, eval mode (no noise, no dropout).

    A zero router ties every logit, so the router alone would only ever pick
    the tie-break's k experts; the probe therefore also runs with each group of
    k experts forced, and a sequence's figure is its max over all those passes.
    """
    modes = dense.training, moe.training
    dense.eval()
    moe.eval()
    moe_cfg = moe.cfg.moe
    try:
        with exact_fp32():
            probe_BT = probe_BT.to(next(dense.parameters()).device)
            logits_dense = dense(probe_BT).logits.float()
            worst_B = torch.zeros(probe_BT.shape[0], device=probe_BT.device)
            for group in [None] + expert_groups(moe_cfg.num_experts, moe_cfg.top_k):
                with forced_experts(moe, group):
                    diff_BTV = (logits_dense - moe(probe_BT).logits.float()).abs()
                worst_B = torch.maximum(worst_B, diff_BTV.amax(dim=(1, 2)))
        return Verification(worst_B.tolist(), tolerance)
    finally:
        dense.train(modes[0])
        moe.train(modes[1])
        moe.reset_readouts()  # the probe is not part of any eval


def probe_from_stream(stream, seq_len: int, n: int, pad_id: int) -> torch.Tensor:
    """The first ``n`` validation windows (contiguous, the eval windows): a frozen probe."""
    from ..data import eval_batches

    x_BT, _ = next(iter(eval_batches(stream, seq_len, n, 1, pad_id=pad_id)))
    return x_BT


def random_probe(vocab: int, seq_len: int, n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (n, seq_len), generator=torch.Generator().manual_seed(seed))


def save_upcycled(out: Path, moe: LM, cfg: RunConfig, tokenizer_file: Path, report: dict) -> Path:
    """Write ``out`` as a run folder whose only checkpoint is the upcycled model at step 0."""
    out = Path(out)
    if list_checkpoints(out):
        raise CheckpointError(f"{out} already has checkpoints; choose another --out for the upcycled run")
    out.mkdir(parents=True, exist_ok=True)
    if Path(tokenizer_file).resolve() != (out / "tokenizer.json").resolve():
        shutil.copy2(tokenizer_file, out / "tokenizer.json")
    save_config(cfg, out / "config.yaml")
    (out / "params.json").write_text(json.dumps(moe.param_counts()), encoding="utf-8")
    (out / "upcycle.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    state = {"step": 0, "tokens_seen": 0, "best_val": float("inf"), "best_step": -1, "elapsed": 0.0,
             "world_size": 1, "upcycled_from": report.get("dense_checkpoint", "")}
    return save_checkpoint(out, 0, moe, None, state, cfg)


def upcycle_run(dense_run: str | Path, out: str | Path, num_experts: int | None = None, top_k: int | None = None,
                overrides: list[str] | None = None, which: str = "last", probe_sequences: int = 8,
                tolerance: float = TOLERANCE, device: str = "auto", log=print) -> Verification:
    """``somoe upcycle``: load a dense run, upcycle, verify, and write ``out`` only if it passed."""
    from ..evaluate.runs import load_run, run_val_stream, tokenizer_file

    if list_checkpoints(Path(out)):
        raise CheckpointError(f"{out} already has checkpoints; choose another --out for the upcycled run")
    run = load_run(dense_run, device=device, which=which)
    if run.cfg.model.ffn != "dense":
        raise ConfigError(f"{dense_run} is a model.ffn={run.cfg.model.ffn} run; upcycling needs a dense run "
                          f"(model.ffn=dense)")
    moe_cfg = moe_config(run.cfg, num_experts, top_k, overrides)
    moe = upcycle_model(run.model, moe_cfg)
    seq_len = run.cfg.data.seq_len
    try:
        stream = run_val_stream(run)
        probe, source = probe_from_stream(stream, seq_len, probe_sequences, run.tokenizer.pad_id), "validation windows"
    except (ConfigError, OSError, ImportError, ValueError) as err:  # the run's data moved: tokens still probe
        probe = random_probe(run.cfg.model.vocab_size, seq_len, probe_sequences)
        source = f"random tokens (validation data unavailable: {str(err)[:80]})"
    E, K = moe_cfg.model.moe.num_experts, moe_cfg.model.moe.top_k
    counts = moe.param_counts()
    log(f"upcycled {run.checkpoint} -> {E} experts top-{K} per layer | {counts['total'] / 1e6:.2f}M parameters "
        f"(dense {run.model.param_counts()['total'] / 1e6:.2f}M) | probe: {probe.shape[0]} x {probe.shape[1]} "
        f"{source}")
    result = verify(run.model, moe, probe, tolerance)
    for line in result.lines():
        log(line)
    if result.passed:
        ckpt = save_upcycled(Path(out), moe, moe_cfg, tokenizer_file(run),
                             {"dense_checkpoint": str(run.checkpoint), "probe": source, **result.as_dict()})
        log(f"wrote {ckpt}")
    return result
