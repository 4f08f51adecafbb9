"""``somoe bench generate``: tokens/s of batched KV-cache generation, ours vs ``transformers.generate``.

Both models have the GPT-2 preset's shape and random weights (bf16 rows: weights
cast to bf16, as inference is run; no autocast), decode
greedily for exactly ``new_tokens`` tokens (no EOS stop) from the same
random prompts. The reference is ``transformers``' ``generate``; ours is
``somoe.generate.sampling.generate_ids``.
"""

from __future__ import annotations

import copy

import torch

from .common import HF_MISSING, add_mfu, add_ratios, hf_available, matmul_ceiling, measure
from .train import hf_gpt2, model_flops


def bench_generate(preset: str = "cpu_gpt2", dtypes=("fp32", "bf16"), batch: int = 8, prompt_len: int = 32,
                   new_tokens: int = 64, reps: int = 3, device: str = "cpu", overrides: tuple[str, ...] = (),
                   notes: list[str] | None = None) -> list[dict]:
    from ..config import load_config
    from ..generate.sampling import GenerationConfig
    from ..models.transformer import build_model

    dev = torch.device(device)
    cfg = load_config(preset=preset, overrides=list(overrides))
    with_hf = hf_available()
    if not with_hf and notes is not None:
        notes.append(HF_MISSING)
    torch.manual_seed(0)
    ours = build_model(cfg.model, dev).eval()
    prompts = torch.randint(1, cfg.model.vocab_size, (batch, prompt_len), device=dev)
    prompt_ids = prompts.tolist()  # our API takes token lists; converted once, outside the timing
    gen = GenerationConfig(max_new_tokens=new_tokens, greedy=True, stop_at_eos=False)
    rows: list[dict] = []
    ceilings = {dt: matmul_ceiling(dev, dt) for dt in dtypes}
    for dtype in dtypes:
        # bf16 rows cast both models' weights to bf16 (inference keeps no fp32 master copy);
        # under autocast every decode step would cast every weight again, on both sides
        tdt = torch.bfloat16 if dtype == "bf16" else torch.float32
        model = copy.deepcopy(ours).to(tdt)
        fns = {"somoe": lambda model=model: _ours(model, prompt_ids, gen)}
        if with_hf:
            hf = hf_gpt2(cfg.model, dev).eval().to(tdt)
            fns["transformers_generate"] = lambda hf=hf: _hf(hf, prompts, new_tokens)
        for name, t in measure(fns, reps, dev, notes=notes).items():
            rows.append({"bench": "generate", "impl": name, "dtype": dtype, "preset": preset, "batch": batch,
                         "prompt_len": prompt_len, "new_tokens": new_tokens, **t,
                         "tokens_per_s": batch * new_tokens / (t["ms"] / 1e3),
                         "flops": _decode_flops(cfg.model, batch, prompt_len, new_tokens),
                         "threads": torch.get_num_threads(), "device": dev.type})
    if with_hf:
        add_ratios(rows, "transformers_generate", ("dtype",), field="tokens_per_s")
    add_mfu(rows, ceilings)
    return rows


def _decode_flops(model_cfg, batch: int, prompt_len: int, new_tokens: int) -> int:
    """Forward FLOPs: the prompt once, then one token per step (attention over the growing cache ignored)."""
    return model_flops(model_cfg, batch, prompt_len, backward=False) + (new_tokens - 1) * model_flops(
        model_cfg, batch, 1, backward=False)


@torch.no_grad()
def _ours(model, prompts, gen):
    from ..generate.sampling import generate_ids

    out = generate_ids(model, prompts, gen, eos_id=-1, pad_id=0)
    assert all(len(row) == gen.max_new_tokens for row in out)


@torch.no_grad()
def _hf(model, prompts, new_tokens):
    out = model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, use_cache=True, pad_token_id=0)
    assert out.shape[1] == prompts.shape[1] + new_tokens


COLUMNS = ["impl", "dtype", "batch", "prompt_len", "new_tokens", "ms", "tokens_per_s", "ratio", "mfu"]
