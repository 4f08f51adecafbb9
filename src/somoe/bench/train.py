"""``somoe bench train``: tokens/s of whole training steps (forward, backward, clip, AdamW, SoME rules).

Our models come from the presets (random token batches of the preset's
batch size and sequence length); the reference is our GPT-2 baseline
(``cpu_gpt2`` unless ``reference`` names another preset) in the same dtype.
bf16 rows run bf16 autocast with fp32 master weights and store SoME's frozen
experts in bf16, fp32 rows in fp32 (``model.some.expert_dtype``, whatever the
preset says), as ``somoe bench layer`` does.
``transformers``' ``GPT2LMHeadModel`` runs at each GPT-2 preset's size (its
learned positions and tied head differ slightly in parameter count; both
are reported).
"""

from __future__ import annotations

import torch

from . import flops
from ..train.runtime import autocast_factory, compile_model
from .common import HF_MISSING, add_mfu, hf_available, matmul_ceiling, measure

DEFAULT_PRESETS = ("cpu_gpt2", "cpu_some", "quickstart")
REFERENCE = "cpu_gpt2"


def _compiled(model: torch.nn.Module, compile: bool) -> torch.nn.Module:
    return compile_model(model) if compile else model


def _step(loss_fn, model, optimizer, precision: str, device: torch.device):
    """One training step: forward (``loss_fn``) under the precision's autocast, backward, clip,
    AdamW, then the SoME rules of any self-organizing layer (ours; transformers' model has none)."""
    organizers = getattr(model, "self_organizing_layers", list)()
    amp = autocast_factory(precision, device)

    def run():
        with amp():
            loss = loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for layer in organizers:
            layer.self_organize(1, 100)

    return run


def hf_gpt2(model_cfg, device) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    c = model_cfg
    cfg = GPT2Config(vocab_size=c.vocab_size, n_positions=c.max_seq_len, n_embd=c.d_model, n_layer=c.n_layers,
                     n_head=c.n_heads, n_inner=c.ffn_hidden, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     bos_token_id=0, eos_token_id=0)
    cfg._attn_implementation = "sdpa"
    return GPT2LMHeadModel(cfg).to(device).train()


def model_flops(model_cfg, batch: int, seq: int, backward: bool = True) -> int:
    """Model FLOPs of one step (or forward) from the config: dense, MoE or SoME FFN per layer."""
    c, T = model_cfg, batch * seq
    if c.ffn == "some" and c.some.router == "product":
        s = c.some
        ffn = flops.some_product_layer(T, c.d_model, s.subkeys_per_codebook, s.top_k, s.pk_heads,
                                       s.subkey_dim(c.d_model), s.d_ffn, backward=backward,
                                       query_hidden=s.query_hidden_width(c.d_model))
    elif c.ffn == "some":
        s = c.some
        ffn = flops.some_layer(T, c.d_model, s.num_experts, s.top_k, s.d_ffn, backward=backward,
                               query_hidden=s.query_hidden_width(c.d_model))
    elif c.ffn == "moe":
        m = c.moe
        ffn = flops.moe_layer(T, c.d_model, m.num_experts, m.top_k, m.d_ffn or c.ffn_hidden,
                              gated=c.activation == "swiglu", backward=backward)
    else:
        ffn = flops.dense_ffn(T, c.d_model, c.ffn_hidden, gated=c.activation == "swiglu", backward=backward)
    return flops.transformer(T, c.d_model, c.n_layers, c.vocab_size, seq, ffn, backward=backward)


def bench_train(presets=DEFAULT_PRESETS, dtypes=("fp32", "bf16"), reps: int = 3, device: str = "cpu",
                overrides: tuple[str, ...] = (), notes: list[str] | None = None, compile: bool = False,
                reference: str = REFERENCE) -> list[dict]:
    """One row per (preset, dtype) plus ``transformers_gpt2@<preset>`` for GPT-2 presets.

    ``reference``: the preset every other preset's ``ratio`` is taken against (always run). On a
    GPU, naming one of the measured presets (e.g. ``seed000_gpt2``) spares building, and under
    ``compile`` compiling, the CPU-sized ``cpu_gpt2``.

    ``compile``: every model (ours and transformers') runs under ``torch.compile``; the
    warm-up step pays the compilation and is not timed.
    """
    from ..config import load_config
    from ..models.transformer import build_model
    from ..train.optim import build_optimizer

    dev = torch.device(device)
    with_hf = hf_available()
    if not with_hf and notes is not None:
        notes.append(HF_MISSING)
    presets = list(dict.fromkeys([reference, *presets]))
    configs = {name: load_config(preset=name, overrides=list(overrides)) for name in presets}
    rows: list[dict] = []
    ceilings = {dt: matmul_ceiling(dev, dt) for dt in dtypes}
    for dtype in dtypes:
        fns, meta = {}, {}
        for name, cfg in configs.items():
            if cfg.model.ffn == "some":  # frozen experts stored in the row's dtype, whatever the preset says
                expert_dtype = "bf16" if dtype == "bf16" else "fp32"
                cfg = load_config(preset=name, overrides=[*overrides, f"model.some.expert_dtype={expert_dtype}"])
            B, T = cfg.train.batch_size, cfg.data.seq_len
            torch.manual_seed(0)
            model = build_model(cfg.model, dev).train()
            x = torch.randint(0, cfg.model.vocab_size, (B, T), device=dev)
            m = _compiled(model, compile)
            fns[name] = _step(lambda m=m, x=x: m(x, x).loss, model, build_optimizer(model, cfg.train, dev.type),
                              dtype, dev)
            meta[name] = (cfg, model.param_counts())
            if with_hf and cfg.model.ffn == "dense" and cfg.model.backbone == "gpt2":
                hf = hf_gpt2(cfg.model, dev)
                hf_name = f"transformers_gpt2@{name}"
                h = _compiled(hf, compile)
                fns[hf_name] = _step(lambda h=h, x=x: h(input_ids=x, labels=x).loss, hf,
                                     build_optimizer(hf, cfg.train, dev.type), dtype, dev)
                n = sum(p.numel() for p in hf.parameters())
                meta[hf_name] = (cfg, {"total": n, "trainable": n})
        times = measure(fns, reps, dev, notes=notes)
        for name, t in times.items():
            cfg, counts = meta[name]
            B, T = cfg.train.batch_size, cfg.data.seq_len
            rows.append({"bench": "train", "impl": name, "dtype": dtype, "preset": name.split("@")[-1],
                         "batch": B, "seq_len": T, "d_model": cfg.model.d_model, "n_layers": cfg.model.n_layers,
                         "params_total": counts["total"], "params_trainable": counts["trainable"], **t,
                         "tokens_per_s": B * T / (t["ms"] / 1e3), "flops": model_flops(cfg.model, B, T),
                         "threads": torch.get_num_threads(), "device": dev.type, "compiled": compile})
    _ratios(rows, reference)
    add_mfu(rows, ceilings)
    return rows


def _ratios(rows: list[dict], reference: str) -> None:
    """tokens/s over the reference's: ``reference`` for our presets, our own preset for transformers' rows;
    ``vs_fp32`` on bf16 rows (the same impl's fp32 tokens/s)."""
    by = {(r["impl"], r["dtype"]): r for r in rows}
    for r in rows:
        ref_impl = r["preset"] if r["impl"].startswith("transformers") else reference
        ref = by.get((ref_impl, r["dtype"]))
        if ref is not None:
            r["reference"], r["ratio"] = ref_impl, r["tokens_per_s"] / ref["tokens_per_s"]
        fp32 = by.get((r["impl"], "fp32"))
        if r["dtype"] != "fp32" and fp32 is not None:
            r["vs_fp32"] = r["tokens_per_s"] / fp32["tokens_per_s"]


COLUMNS = ["impl", "dtype", "batch", "seq_len", "params_trainable", "ms", "tokens_per_s", "reference", "ratio",
           "vs_fp32", "mfu"]
