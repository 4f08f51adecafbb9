"""Ablation C (seed 001): does address-only plasticity help under a domain shift?

Both modes start from the same checkpoint state (frozen mode runs first and changes no buffer)
and read the same stream:
``pre`` batches of held-out in-domain text, then ``shift`` batches of
out-of-domain text. In ``frozen`` mode the keys never move; in ``active`` mode
every SoME layer gathers statistics in the forward and applies its
self-organizing rules after each batch (end-of-training rates, as
``somoe eval --adapt``). Each batch is scored *before* the keys update on it,
so the curve is an honest online perplexity. Afterwards, with keys fixed where
the stream left them, both modes are scored on held-out out-of-domain text
(post-shift validation) and on held-out in-domain text (forgetting).
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import ConfigError
from ..data import TokenStream, eval_batches
from ..data.batches import eval_windows
from ..evaluate.runs import LoadedRun, load_run

MODES = ("frozen", "active")


@dataclass
class ShiftData:
    stream: list  # batches: pre in-domain, then shift out-of-domain
    shift_at: int  # index of the first out-of-domain batch
    heldout_in: list
    heldout_ood: list


@dataclass
class ModeResult:
    mode: str
    stream_loss: list[float]  # per batch, nats/token, scored before that batch's key update
    stream_tokens: list[int]
    post_ood: dict = field(default_factory=dict)  # loss, ppl, bpb on held-out out-of-domain text
    post_in: dict = field(default_factory=dict)  # the same on held-out in-domain text (forgetting)
    key_move: float = 0.0  # mean over layers and experts of ||k_after - k_before|| (unit keys: chord length)


def _n_batches(stream: TokenStream, seq_len: int, batch_size: int) -> int:
    return math.ceil(eval_windows(len(stream), seq_len) / batch_size)


def _batches(stream: TokenStream, seq_len: int, batch_size: int, start: int, stop: int) -> list:
    """Batches ``start:stop`` of the stream's eval batches (only those are built)."""
    return list(itertools.islice(eval_batches(stream, seq_len, batch_size, 0), start, stop))


def split_shift(in_stream: TokenStream, ood_stream: TokenStream, seq_len: int, batch_size: int, pre: int,
                shift: int, heldout: int) -> ShiftData:
    """Disjoint batches: in-domain [stream | held-out], out-of-domain [stream | held-out]."""
    n_in, n_ood = _n_batches(in_stream, seq_len, batch_size), _n_batches(ood_stream, seq_len, batch_size)
    if pre + heldout > n_in:
        raise ConfigError(f"the in-domain text has {n_in} batches of {batch_size}x{seq_len}, fewer than "
                          f"--pre-batches {pre} + --heldout-batches {heldout}; lower them")
    if shift + heldout > n_ood:
        raise ConfigError(f"the shift text has {n_ood} batches of {batch_size}x{seq_len}, fewer than "
                          f"--shift-batches {shift} + --heldout-batches {heldout}; lower them or use more text")
    ood = _batches(ood_stream, seq_len, batch_size, 0, shift + heldout)
    return ShiftData(_batches(in_stream, seq_len, batch_size, 0, pre) + ood[:shift], pre,
                     _batches(in_stream, seq_len, batch_size, n_in - heldout, n_in), ood[shift:])


def som_state(model) -> dict[str, torch.Tensor]:
    """Copies of every SoME layer's persistent buffers (keys, usage, dormancy, ...)."""
    return {f"{i}.{name}": buf.detach().clone() for i, layer in enumerate(model.self_organizing_layers())
            for name, buf in layer.named_buffers() if not name.startswith(("stat_", "expert_"))}


def _score(loaded: LoadedRun, batches: list, adapt: bool, on_batch=None) -> dict:
    from ..evaluate.scoring import evaluate_loaded

    result = evaluate_loaded(loaded, batches, adapt=adapt, on_batch=on_batch)
    return {"loss": result.loss, "ppl": result.ppl, "bpb": result.bpb, "tokens": result.tokens}


def run_mode(loaded: LoadedRun, data: ShiftData, mode: str) -> ModeResult:
    """Stream ``data`` through a freshly loaded model with keys ``frozen`` or self-organizing (``active``)."""
    if mode not in MODES:
        raise ConfigError(f"unknown adaptation mode {mode!r}; use one of {MODES}")
    if not loaded.model.self_organizing_layers():
        raise ConfigError(f"{loaded.run_dir} has no SoME layers; ablation C needs a run with model.ffn=some")
    before = {k: v for k, v in som_state(loaded.model).items() if k.endswith(".key_store")}
    result = ModeResult(mode, [], [])

    def record(i, nll, tokens):
        result.stream_loss.append(nll / max(tokens, 1))
        result.stream_tokens.append(tokens)

    _score(loaded, data.stream, adapt=mode == "active", on_batch=record)
    result.post_ood = _score(loaded, data.heldout_ood, adapt=False)
    result.post_in = _score(loaded, data.heldout_in, adapt=False)
    after = som_state(loaded.model)
    result.key_move = float(torch.stack([(after[k] - v).norm(dim=1).mean() for k, v in before.items()]).mean())
    return result


def plot_adaptation(results: list[ModeResult], shift_at: int, title: str, path: Path) -> Path:
    from .plots import pyplot, save

    fig, axes = pyplot().subplots(1, 2, figsize=(13, 4.2))
    for r, color in zip(results, ("C0", "C3")):
        ppl = [math.exp(min(v, 50)) for v in r.stream_loss]
        axes[0].plot(range(len(ppl)), ppl, "o-", ms=3, color=color, label=f"{r.mode} keys")
    frozen, active = results[0].stream_loss, results[1].stream_loss
    axes[1].bar(range(len(frozen)), [a - f for f, a in zip(frozen, active)], color="C2")
    axes[1].axhline(0, color="k", lw=0.8)
    for ax in axes:
        ax.axvline(shift_at - 0.5, color="gray", ls="--", lw=1)
    axes[0].set(xlabel="stream batch (in-domain, then out-of-domain after the dashed line)",
                ylabel="perplexity (scored before the batch's key update)", yscale="log",
                title="perplexity over the stream")
    axes[0].legend()
    axes[1].set(xlabel="stream batch", ylabel="loss active - frozen (nats/token)",
                title="per-batch effect of self-organization (< 0: it helps)")
    fig.suptitle(title)
    return save(fig, path)


def _mean(values: list[float], tokens: list[int]) -> float:
    return sum(v * t for v, t in zip(values, tokens)) / max(sum(tokens), 1)


def run_adaptation(run: str | Path, shift_data: str | None = None, out: str | Path | None = None, in_data: str | None = None,
                   pre: int = 8, shift: int = 24, heldout: int = 8, batch_size: int = 8, which: str = "last",
                   device: str = "cpu", log=print) -> dict:
    """Ablation C on one checkpoint; writes adapt.md / adapt.json / adapt.png into ``out`` (default RUN/adapt).

    ``shift_data`` None: the built-in out-of-domain text (The Adventures of Sherlock Holmes)."""
    from ..data import builtin_ood_text, encode_stories_for_eval
    from ..data.packaged import OOD_NAME
    from ..evaluate.runs import file_stream, run_val_stream

    first = load_run(run, device=device, which=which)
    in_stream = file_stream(in_data, first) if in_data else run_val_stream(first)
    if shift_data:
        ood_stream = file_stream(shift_data, first)
    else:
        ood_stream, shift_data = encode_stories_for_eval([builtin_ood_text()], first.tokenizer), OOD_NAME
    data = split_shift(in_stream, ood_stream, first.cfg.data.seq_len, batch_size, pre, shift,
                       heldout)
    results, modes = [], {}
    for mode in MODES:  # frozen first: it leaves every buffer as loaded (tests/analysis/test_adapt.py), so
        r = run_mode(first, data, mode)  # the active mode starts from the checkpoint state too
        results.append(r)
        m = modes[mode] = {"stream_loss": r.stream_loss, "stream_tokens": r.stream_tokens,
                           "stream_ppl_in": math.exp(_mean(r.stream_loss[:pre], r.stream_tokens[:pre])),
                           "stream_ppl_shifted": math.exp(_mean(r.stream_loss[pre:], r.stream_tokens[pre:])),
                           "post_ood": r.post_ood, "post_in": r.post_in, "key_move": r.key_move}
        log(f"{mode:6s}: stream ppl in-domain {m['stream_ppl_in']:.2f} -> shifted {m['stream_ppl_shifted']:.2f} "
            f"| post-shift val ppl {r.post_ood['ppl']:.2f} | in-domain ppl after {r.post_in['ppl']:.2f} | key move "
            f"{r.key_move:.4f}")
    # frozen keys never move, so the frozen mode's held-out scores are the checkpoint's own ("before")
    reference = {"in": results[0].post_in, "ood": results[0].post_ood}
    out = Path(out) if out else first.run_dir / "adapt"
    out.mkdir(parents=True, exist_ok=True)
    summary = {"run": str(first.checkpoint), "shift_data": str(shift_data), "in_data": in_data or "validation split",
               "batch": [batch_size, first.cfg.data.seq_len], "pre_batches": pre, "shift_batches": shift,
               "heldout_batches": heldout, "before": reference, "modes": modes}
    (out / "adapt.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    plot_adaptation(results, pre, f"ablation C: {first.run_dir.name} ({first.checkpoint.name}), "
                                  f"shift to {Path(shift_data).name}", out / "adapt.png")
    (out / "adapt.md").write_text(_markdown(summary), encoding="utf-8")
    log(f"wrote {out / 'adapt.md'}")
    return summary


def _markdown(s: dict) -> str:
    b = s["before"]
    lines = [f"# Ablation C: in-inference adaptation of `{s['run']}`", "",
             f"Stream: {s['pre_batches']} batches of in-domain text ({s['in_data']}), then {s['shift_batches']} "
             f"batches of `{s['shift_data']}`; batches of {s['batch'][0]} windows x {s['batch'][1]} tokens. "
             f"Held out: {s['heldout_batches']} batches of each domain, disjoint from the stream. Both modes start "
             f"from the same checkpoint state.", "",
             f"Checkpoint keys (= frozen mode after the stream): in-domain held-out ppl {b['in']['ppl']:.3f}, "
             f"out-of-domain held-out ppl {b['ood']['ppl']:.3f}. Forgetting: in-domain held-out ppl after the "
             f"stream minus that.", "",
             "| keys | stream ppl, in-domain part | stream ppl, shifted part | post-shift val ppl (OOD) | "
             "in-domain ppl after shift | forgetting (ppl change) | mean key move |", "|---|---|---|---|---|---|---|"]
    for mode, m in s["modes"].items():
        lines.append(f"| {mode} | {m['stream_ppl_in']:.3f} | {m['stream_ppl_shifted']:.3f} | {m['post_ood']['ppl']:.3f} "
                     f"| {m['post_in']['ppl']:.3f} | {m['post_in']['ppl'] - b['in']['ppl']:+.3f} | "
                     f"{m['key_move']:.4f} |")
    return "\n".join(lines + ["", "![perplexity over the stream](adapt.png)", ""])
