"""The model card (README.md) of an export: preset, data, validation bpb, parameters, licence, citation."""

from __future__ import annotations

import json

from ..evaluate.runs import LoadedRun

SEEDS = {
    "some": "seed 000, \"SoME vs GPT-2 (Transformer Baseline) on TinyStories\" (Self-Organizing Mixture of Experts)",
    "moe": "seed 003, \"NanoGPT with Mixture of Experts (MoE) - TinyStories Training\"",
    "dense": "seed 000's GPT-2-style Transformer baseline, \"SoME vs GPT-2 on TinyStories\"",
}
TRANSITION_SEED = "seed 004, \"Dense to MoE Transition Experiment\""


def last_val_bpb(loaded: LoadedRun) -> tuple[float | None, int | None]:
    """The last ``val_bpb`` (and its step) in the run's metrics.jsonl, at or before the exported step."""
    file = loaded.run_dir / "metrics.jsonl"
    if not file.is_file():
        return None, None
    ckpt_step = int(loaded.checkpoint.name.split("-")[-1]) if loaded.checkpoint.name.startswith("step-") else None
    best = (None, None)
    for line in file.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "val_bpb" in rec and (ckpt_step is None or rec.get("step", 0) <= ckpt_step):
            best = (rec["val_bpb"], rec.get("step"))
    return best


def active_params(loaded: LoadedRun, total: int) -> int:
    """Parameters one token uses: all but the experts its router does not pick."""
    cfg = loaded.cfg.model
    inactive = 0
    for ffn in loaded.model.ffns():
        if cfg.ffn == "moe":
            E, k = cfg.moe.num_experts, cfg.moe.top_k
            per_layer = sum(p.numel() for n, p in ffn.named_parameters() if n.startswith("expert_"))
        elif cfg.ffn == "some":
            E, k = cfg.some.num_experts, ffn.top_k_now * (cfg.some.pk_heads if ffn.product else 1)
            per_layer = ffn.frozen_param_count() + ffn.procedural_param_count() + sum(
                p.numel() for n, p in ffn.named_parameters() if n.startswith("lora_"))
        else:
            continue
        inactive += per_layer * (E - k) // E
    return total - inactive


def data_description(loaded: LoadedRun) -> str:
    d = loaded.cfg.data
    source = d.source if d.source != "auto" else ("files" if d.train_path else "builtin")
    if source == "files":
        return f"local files (train: `{d.train_path}`, validation: `{d.val_path or 'last share of train'}`)"
    if source == "tinystories":
        return f"TinyStories (`{d.hub_dataset}`), first {d.hub_train_stories} train / {d.hub_val_stories} validation stories"
    return (f"somoe's built-in story corpus (`data.builtin_train_stories={d.builtin_train_stories}`, "
            f"`data.builtin_val_stories={d.builtin_val_stories}`)")


def _experts_note(m) -> str:
    """How the card's reader can trust the frozen experts."""
    if m.ffn != "some":
        return ""
    if m.some.expert_storage == "procedural":
        return (" Frozen experts are not stored: the remote code regenerates them from integer hashes and checks "
                "a digest of a fixed sample (config.json `some.procedural_digest`) on load.")
    return " Frozen experts are stored in model.safetensors; their sha256 (config.json `expert_sha256`) is checked on load."


def model_card(loaded: LoadedRun, native: str | None) -> str:
    cfg = loaded.cfg
    counts = loaded.model.param_counts()
    bpb, bpb_step = last_val_bpb(loaded)
    bpb_text = f"{bpb:.4f} (step {bpb_step})" if bpb is not None else "not recorded (no eval in metrics.jsonl)"
    seed = TRANSITION_SEED if cfg.name.startswith(("seed004", "cpu_transition")) else SEEDS.get(cfg.model.ffn, SEEDS["dense"])
    remote = native is None
    load_args = "trust_remote_code=True" if remote else ""
    cls = native or "SomoeForCausalLM (remote code: configuration_somoe.py, modeling_somoe.py)"
    m = cfg.model
    return f"""---
license: mit
library_name: transformers
pipeline_tag: text-generation
tags: [somoe, {m.ffn}, {m.backbone}]
---

# {cfg.name}

A {m.backbone}-backbone language model with a `{m.ffn}` feed-forward layer, trained with
somoe and exported with `somoe export`. {cfg.description}

| | |
|---|---|
| preset / run name | `{cfg.name}` |
| class | `{cls}` |
| checkpoint | `{loaded.checkpoint.name}` |
| shape | {m.n_layers} layers, d_model {m.d_model}, {m.n_heads} heads, context {m.max_seq_len}, vocabulary {m.vocab_size} |
| data | {data_description(loaded)} |
| validation bits per byte | {bpb_text} |
| parameters: total / trainable / active per token | {counts['total']:,} / {counts['trainable']:,} / {active_params(loaded, counts['total']):,} |

## Use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("PATH"{', ' + load_args if load_args else ''})
tok = AutoTokenizer.from_pretrained("PATH")
ids = tok("Once upon a time", return_tensors="pt")   # starts with [EOS], the story start
print(tok.decode(model.generate(**ids, max_new_tokens=40, do_sample=False)[0]))
```

The tokenizer prepends `[EOS]` (the token every training story follows), as `somoe generate` does.
Logits equal somoe's within 1e-4 in fp32.{_experts_note(m)}

## Licence

MIT.

## Citation

Experiment reproduced: {seed}.

```bibtex
@misc{{somoe,
  title  = {{somoe: Self-Organizing Mixture-of-Experts language models}},
  note   = {{Reproduction of {seed.split(',')[0]}}},
  year   = {{2026}}
}}
```
"""
