"""``somoe import-hf DIR --out RUN``: a local GPT-2 or Llama checkpoint as a somoe dense run.

The run holds config.yaml, tokenizer.json and a step-0 checkpoint, so ``somoe train``
(resume), ``eval``, ``generate`` and ``upcycle`` (seed 004: pretrained dense -> MoE) take it.

somoe's tokenizer contract is ``[UNK]=0, [PAD]=1, [EOS]=2``, so the vocabulary is
renumbered: the source's EOS becomes ``[EOS]`` (id 2), its UNK and PAD (when it has them,
distinct from EOS) become ``[UNK]``/``[PAD]``, every other token keeps its order after them.
Embedding and head rows move with their tokens; a special the source lacks gets a new zero
row (its logit is 0; the logits of every source token are unchanged, only renumbered).
Grouped-query attention (Llama/SmolLM) becomes multi-head attention by repeating each key
and value head for the query heads that share it, which computes the same thing.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import ConfigError, load_config, save_config
from ..data import BPETokenizer
from ..models import build_model
from ..train.checkpoint import CheckpointError, check_safetensors, list_checkpoints, save_checkpoint

SUPPORTED = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}
UNSUPPORTED_MSG = "supported: " + ", ".join(f"{cls} (model_type {t})" for t, cls in SUPPORTED.items())
TOLERANCE = 1e-4


@dataclass
class Imported:
    run: Path
    old_to_new: list[int]  # somoe id of each source id
    max_diff: float  # max |logit difference| on the check batch (source tokens, fp32)


def read_json(file: Path):
    """A JSON file of the model folder; one line naming the file when it is not UTF-8 JSON."""
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(f"{file} is not UTF-8 text (bad byte at offset {err.start}); re-save the model folder "
                          f"(save_pretrained) or download it again") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"{file} is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg}); re-save the "
                          f"model folder (save_pretrained) or download it again") from None


def read_config(folder: Path) -> dict:
    if not folder.is_dir():
        what = "is a file" if folder.exists() else "does not exist"
        raise ConfigError(f"{folder} {what}; pass a local Hugging Face model folder (config.json, model.safetensors, "
                          f"tokenizer.json)")
    file = folder / "config.json"
    if not file.is_file():
        raise ConfigError(f"{folder} has no config.json; pass a local Hugging Face model folder")
    config = read_json(file)
    if not isinstance(config, dict):
        raise ConfigError(f"{file} is not a JSON object; pass a Hugging Face config.json")
    if config.get("model_type") not in SUPPORTED:
        arch = (config.get("architectures") or [config.get("model_type")])[0]
        raise ConfigError(f"{folder}: architecture {arch} cannot be imported; {UNSUPPORTED_MSG}")
    return config


def check_weights(folder: Path) -> None:
    """Refuse pickled weights and an index that names a missing shard, before anything is loaded."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        data = read_json(index)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict):
            raise ConfigError(f"{index} has no weight_map; download the complete checkpoint")
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise ConfigError(f"{folder}: shard {missing[0]} listed in model.safetensors.index.json is missing "
                              f"({len(missing)} of {len(shards)}); download the complete checkpoint")
    elif not (folder / "model.safetensors").is_file():
        raise ConfigError(f"{folder} has no model.safetensors (pickled .bin weights are not read); "
                          f"save the model with safe_serialization=True")
    else:
        shards = ["model.safetensors"]
    for shard in shards:
        try:
            check_safetensors(folder / shard)
        except CheckpointError as err:
            raise ConfigError(f"{folder / shard} is truncated or corrupt; download the checkpoint again "
                              f"({str(err).split('(', 1)[-1].split(')')[0]})") from None


# --- config -------------------------------------------------------------------------------------
def somoe_overrides(hf: dict, vocab_size: int) -> list[str]:
    """The somoe ``model.*`` settings that compute what the HF config computes, or a ConfigError."""
    def refuse(what: str) -> ConfigError:
        return ConfigError(f"{hf['model_type']} checkpoint with {what} has no exact somoe equivalent; {UNSUPPORTED_MSG} "
                           f"with the standard settings")

    if hf["model_type"] == "gpt2":
        if hf.get("activation_function", "gelu_new") not in ("gelu", "relu"):
            raise refuse(f"activation_function={hf.get('activation_function', 'gelu_new')} (somoe has exact gelu, relu)")
        if hf.get("scale_attn_by_inverse_layer_idx") or not hf.get("scale_attn_weights", True):
            raise refuse("non-standard attention scaling")
        d = hf["n_embd"]
        return [f"model.backbone=gpt2", "model.positions=learned", "model.bias=true", f"model.d_model={d}",
                f"model.n_layers={hf['n_layer']}", f"model.n_heads={hf['n_head']}",
                f"model.max_seq_len={hf['n_positions']}", f"model.d_ffn={hf.get('n_inner') or 4 * d}",
                f"model.activation={hf.get('activation_function')}", f"model.norm_eps={hf.get('layer_norm_epsilon', 1e-5)}",
                f"model.tie_embeddings={str(hf.get('tie_word_embeddings', True)).lower()}", f"model.vocab_size={vocab_size}"]
    rope = hf.get("rope_parameters") or {}
    if (hf.get("rope_scaling") or {}).get("rope_type", "default") != "default" or rope.get("rope_type", "default") != "default":
        raise refuse("scaled RoPE")
    if hf.get("attention_bias") or hf.get("mlp_bias") or hf.get("hidden_act", "silu") != "silu":
        raise refuse("biases or a non-SiLU activation")
    heads = hf["num_attention_heads"]
    if hf.get("head_dim", hf["hidden_size"] // heads) * heads != hf["hidden_size"]:
        raise refuse("head_dim * heads != hidden_size")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    return ["model.backbone=smollm", "model.positions=rope", "model.activation=swiglu", "model.bias=false",
            f"model.d_model={hf['hidden_size']}", f"model.n_layers={hf['num_hidden_layers']}", f"model.n_heads={heads}",
            f"model.max_seq_len={hf['max_position_embeddings']}", f"model.d_ffn={hf['intermediate_size']}",
            f"model.rope_base={theta}", f"model.norm_eps={hf.get('rms_norm_eps', 1e-6)}",
            f"model.tie_embeddings={str(hf.get('tie_word_embeddings', False)).lower()}", f"model.vocab_size={vocab_size}"]


# --- tokenizer -----------------------------------------------------------------------------------
def _special(folder: Path, hf: dict, vocab: dict[str, int], name: str) -> int | None:
    """Id of the source's ``name`` token (eos/unk/pad) from tokenizer_config.json or config.json."""
    settings_file = folder / "tokenizer_config.json"
    settings = read_json(settings_file) if settings_file.is_file() else {}
    token = settings.get(f"{name}_token")
    if isinstance(token, dict):
        token = token.get("content")
    if isinstance(token, str) and token in vocab:
        return vocab[token]
    tid = hf.get(f"{name}_token_id")
    return tid[0] if isinstance(tid, list) else tid


def renumber_tokenizer(folder: Path, hf: dict, model_vocab: int) -> tuple[dict, list[int | None]]:
    """(somoe tokenizer.json as a dict, source id of each somoe id: None for a new special row)."""
    file = folder / "tokenizer.json"
    if not file.is_file():
        raise ConfigError(f"{folder} has no tokenizer.json; save the tokenizer with a fast (Rust) backend")
    tok = read_json(file)
    if not isinstance(tok, dict) or not isinstance(tok.get("model"), dict):
        raise ConfigError(f"{file} is not a tokenizers JSON file (no model section); save the tokenizer again")
    model = tok.get("model", {})
    byte_level = "ByteLevel" in json.dumps(tok.get("pre_tokenizer")) or "ByteLevel" in json.dumps(tok.get("decoder"))
    if model.get("type") != "BPE" or not byte_level:
        raise ConfigError(f"{folder}: tokenizer is {model.get('type')} without byte-level pre-tokenization; somoe "
                          f"imports byte-level BPE tokenizers (GPT-2, SmolLM) only")
    vocab = dict(model["vocab"])
    for added in tok.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
    eos = _special(folder, hf, vocab, "eos")
    if eos is None:
        raise ConfigError(f"{folder}: no EOS token in tokenizer_config.json or config.json; set eos_token")
    picks = [eos]
    unk, pad = _special(folder, hf, vocab, "unk"), _special(folder, hf, vocab, "pad")
    unk = unk if unk is not None and unk != eos else None
    pad = pad if pad is not None and pad not in (eos, unk) else None
    source_of_new = [unk, pad, eos] + [i for i in range(model_vocab) if i not in (unk, pad, eos)]
    new_of_old = {old: new for new, old in enumerate(source_of_new) if old is not None}
    names = {unk: "[UNK]", pad: "[PAD]", eos: "[EOS]"}
    string_of_old = {i: s for s, i in vocab.items()}
    new_vocab = {}
    for old, s in string_of_old.items():
        if old in names or old not in new_of_old:
            continue
        new_vocab[s] = new_of_old[old]
    for new, name in enumerate(("[UNK]", "[PAD]", "[EOS]")):
        new_vocab[name] = new
    added_names = set(names.values()) | {"[UNK]", "[PAD]", "[EOS]"}
    added = [{"id": i, "content": n, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": True} for i, n in enumerate(("[UNK]", "[PAD]", "[EOS]"))]
    for a in tok.get("added_tokens", []):
        if a["id"] in names or a["content"] in added_names:
            continue
        added.append({**a, "id": new_of_old[a["id"]]})
    model_vocab_only = {s: i for s, i in new_vocab.items()
                        if s in model["vocab"] or s in ("[UNK]", "[PAD]", "[EOS]")}
    tok["model"] = {**model, "vocab": model_vocab_only, "unk_token": "[UNK]"}
    tok["added_tokens"] = sorted(added, key=lambda a: a["id"])
    tok["post_processor"] = None  # its templates name source ids; somoe adds EOS itself
    return tok, source_of_new


# --- weights -------------------------------------------------------------------------------------
def _rows(t: torch.Tensor, source_of_new: list[int | None]) -> torch.Tensor:
    """Rows of ``t`` in somoe's token order; a new special's row is zero."""
    out = torch.zeros(len(source_of_new), *t.shape[1:], dtype=t.dtype)
    for new, old in enumerate(source_of_new):
        if old is not None:
            out[new] = t[old]
    return out


def gpt2_state(hf_model, n_layers: int) -> dict[str, torch.Tensor]:
    sd = hf_model.state_dict()
    conv1d = type(hf_model.transformer.h[0].attn.c_attn).__name__ == "Conv1D"  # (in, out): transpose
    lin = (lambda w: w.t()) if conv1d else (lambda w: w)
    out = {"tok_emb.weight": sd["transformer.wte.weight"], "pos_emb.weight": sd["transformer.wpe.weight"],
           "norm_f.weight": sd["transformer.ln_f.weight"], "norm_f.bias": sd["transformer.ln_f.bias"],
           "head.weight": sd.get("lm_head.weight", sd["transformer.wte.weight"])}
    for i in range(n_layers):
        h, s = f"transformer.h.{i}.", f"blocks.{i}."
        for theirs, ours in (("ln_1", "norm1"), ("ln_2", "norm2")):
            out[s + ours + ".weight"], out[s + ours + ".bias"] = sd[h + theirs + ".weight"], sd[h + theirs + ".bias"]
        for theirs, ours in (("attn.c_attn", "attn.qkv"), ("attn.c_proj", "attn.proj"), ("mlp.c_fc", "ffn.fc_in"),
                             ("mlp.c_proj", "ffn.fc_out")):
            out[s + ours + ".weight"], out[s + ours + ".bias"] = lin(sd[h + theirs + ".weight"]), sd[h + theirs + ".bias"]
    return out


def llama_state(hf_model, hf: dict) -> dict[str, torch.Tensor]:
    sd = hf_model.state_dict()
    heads = hf["num_attention_heads"]
    groups = heads // hf.get("num_key_value_heads", heads)  # query heads per key/value head

    def kv(w: torch.Tensor) -> torch.Tensor:  # GQA -> MHA: each kv head once per query head it serves
        return w.view(-1, w.shape[0] // (heads // groups), w.shape[1]).repeat_interleave(groups, 0).reshape(-1, w.shape[1])

    out = {"tok_emb.weight": sd["model.embed_tokens.weight"], "norm_f.weight": sd["model.norm.weight"],
           "head.weight": sd.get("lm_head.weight", sd["model.embed_tokens.weight"])}
    for i in range(hf["num_hidden_layers"]):
        h, s = f"model.layers.{i}.", f"blocks.{i}."
        a = h + "self_attn."
        out[s + "attn.qkv.weight"] = torch.cat([sd[a + "q_proj.weight"], kv(sd[a + "k_proj.weight"]),
                                                kv(sd[a + "v_proj.weight"])])
        out[s + "attn.proj.weight"] = sd[a + "o_proj.weight"]
        out[s + "norm1.weight"], out[s + "norm2.weight"] = sd[h + "input_layernorm.weight"], sd[h + "post_attention_layernorm.weight"]
        out[s + "ffn.fc_gate.weight"] = sd[h + "mlp.gate_proj.weight"]
        out[s + "ffn.fc_in.weight"] = sd[h + "mlp.up_proj.weight"]
        out[s + "ffn.fc_out.weight"] = sd[h + "mlp.down_proj.weight"]
    return out


# --- the command -----------------------------------------------------------------------------------
def import_hf(folder: str | Path, out: str | Path, log=print) -> Imported:
    folder, out = Path(folder), Path(out)
    hf = read_config(folder)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder; choose another --out")
    check_weights(folder)
    if list_checkpoints(out) or (out / "config.yaml").exists():
        raise ConfigError(f"{out} already holds a run; choose another --out")
    tok_json, source_of_new = renumber_tokenizer(folder, hf, hf["vocab_size"])
    cfg = load_config(overrides=somoe_overrides(hf, len(source_of_new)) +
                      [f"name={out.name}", f"data.seq_len={min(256, _max_len(hf))}",
                       f"data.tokenizer_path={(out / 'tokenizer.json').resolve()}", "train.precision=fp32"])
    cfg.description = f"imported from {folder.resolve()} ({hf['model_type']})"
    from transformers import AutoModelForCausalLM  # seconds to import: only once the folder has passed the checks

    hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval() if _has_dtype_kwarg() \
        else AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    state = gpt2_state(hf_model, hf["n_layer"]) if hf["model_type"] == "gpt2" else llama_state(hf_model, hf)
    for key in ("tok_emb.weight", "head.weight"):
        state[key] = _rows(state[key], source_of_new)
    model = build_model(cfg.model)
    model.load_state_dict({k: v.contiguous() for k, v in state.items()}, strict=True)
    model.eval()
    max_diff = compare(hf_model, model, source_of_new, min(cfg.data.seq_len, 32))
    if not max_diff < TOLERANCE:
        raise ConfigError(f"imported model differs from {folder} by {max_diff:.2e} in logits (> {TOLERANCE}); "
                          f"nothing written")
    write_run(out, cfg, model, tok_json)
    log(f"imported {folder} ({hf['model_type']}) -> {out}: {len(source_of_new)} tokens, "
        f"max |logit diff| {max_diff:.1e} on a check batch")
    new_of_old = {old: new for new, old in enumerate(source_of_new) if old is not None}
    return Imported(out, [new_of_old[i] for i in range(hf["vocab_size"])], max_diff)


def _max_len(hf: dict) -> int:
    return hf.get("n_positions") or hf["max_position_embeddings"]


def _has_dtype_kwarg() -> bool:
    import transformers

    return int(transformers.__version__.split(".")[0]) >= 5  # 4.x calls it torch_dtype


@torch.no_grad()
def compare(hf_model, model, source_of_new: list[int | None], seq_len: int) -> float:
    """Max |logit difference| over source tokens on random source ids (somoe ids renumbered)."""
    real = torch.tensor([i for i, old in enumerate(source_of_new) if old is not None])
    old_ids = torch.tensor([source_of_new[i] for i in real.tolist()])
    pick = torch.randint(0, len(real), (2, seq_len), generator=torch.Generator().manual_seed(0))
    theirs = hf_model(old_ids[pick]).logits[..., old_ids]
    ours = model(real[pick]).logits[..., real]
    return float((theirs - ours).abs().max())


def write_run(out: Path, cfg, model, tok_json: dict) -> None:
    """config.yaml, tokenizer.json and a step-0 checkpoint, written in ``out.tmp`` then moved in."""
    tmp = out.with_name(out.name + ".import-tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        (tmp / "tokenizer.json").write_text(json.dumps(tok_json, ensure_ascii=False), encoding="utf-8")
        BPETokenizer.load(tmp / "tokenizer.json")  # somoe's own contract: [UNK]=0, [PAD]=1, [EOS]=2
        save_config(cfg, tmp / "config.yaml")
        (tmp / "params.json").write_text(json.dumps(model.param_counts()), encoding="utf-8")
        state = {"step": 0, "tokens_seen": 0, "best_val": float("inf"), "best_step": -1, "elapsed": 0.0,
                 "world_size": 1, "imported_from": cfg.description}
        save_checkpoint(tmp, 0, model, None, state, cfg)
        out.mkdir(parents=True, exist_ok=True)
        for item in tmp.iterdir():
            item.rename(out / item.name)
        tmp.rmdir()
    except OSError as err:  # a file where the folder goes, a read-only or full disk: nothing is left behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise ConfigError(f"--out {out} cannot be written ({err.strerror}: {err.filename}); choose another "
                          f"--out") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
