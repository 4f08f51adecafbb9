"""Which Hugging Face class a somoe model maps to, and its weights and config under that class.

Native classes are used only where ``transformers`` computes exactly what somoe computes:

* ``GPT2LMHeadModel``: gpt2 backbone, dense FFN, learned positions, GELU (exact, erf) or ReLU.
  A bias-free run maps with zero biases (LayerNorm and Linear), which is exact.
* ``LlamaForCausalLM``: smollm backbone, dense SwiGLU FFN (RoPE in the same half-split layout).
* ``MixtralForCausalLM``: smollm backbone, classic MoE without expert capacity. Mixtral takes a
  softmax over all router logits, keeps the top k and renormalises them: that equals somoe's
  softmax over the top-k logits (the router noise is training-only).

Everything else (SoME, gpt2-backbone MoE, RoPE/sinusoidal/no positions in a gpt2 backbone,
MoE with capacity dropping) takes the remote-code route: ``modeling_somoe.py``.
Weight layouts follow the 4.x checkpoints, which 5.x converts on load.
"""

from __future__ import annotations

import hashlib

import torch

from ..config import ModelConfig

BOS_EOS_ID, PAD_ID = 2, 1  # somoe's tokenizer: [UNK]=0, [PAD]=1, [EOS]=2; EOS also starts a story


def native_class(cfg: ModelConfig) -> str | None:
    """``GPT2LMHeadModel``, ``LlamaForCausalLM``, ``MixtralForCausalLM`` or None (remote code)."""
    if cfg.backbone == "gpt2" and cfg.ffn == "dense" and cfg.positions == "learned" \
            and cfg.activation in ("gelu", "relu"):
        return "GPT2LMHeadModel"
    if cfg.backbone == "smollm" and cfg.ffn == "dense":
        return "LlamaForCausalLM"
    if cfg.backbone == "smollm" and cfg.ffn == "moe" and cfg.moe.capacity_factor == 0:
        return "MixtralForCausalLM"
    return None


def _common(cfg: ModelConfig) -> dict:
    return {"vocab_size": cfg.vocab_size, "tie_word_embeddings": cfg.tie_embeddings, "bos_token_id": BOS_EOS_ID,
            "eos_token_id": BOS_EOS_ID, "pad_token_id": PAD_ID, "torch_dtype": "float32", "use_cache": True}


# --- GPT-2 -----------------------------------------------------------------------------------------
def gpt2_config(cfg: ModelConfig) -> dict:
    return {**_common(cfg), "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
            "n_positions": cfg.max_seq_len, "n_ctx": cfg.max_seq_len, "n_embd": cfg.d_model, "n_layer": cfg.n_layers,
            "n_head": cfg.n_heads, "n_inner": cfg.ffn_hidden, "activation_function": cfg.activation,
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "layer_norm_epsilon": cfg.norm_eps,
            "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False}


def _or_zeros(t: torch.Tensor | None, n: int) -> torch.Tensor:
    return t if t is not None else torch.zeros(n)


def gpt2_weights(cfg: ModelConfig, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """GPT-2's Conv1D stores (in, out): somoe's Linear weights transposed."""
    D = cfg.d_model
    out = {"transformer.wte.weight": sd["tok_emb.weight"], "transformer.wpe.weight": sd["pos_emb.weight"],
           "transformer.ln_f.weight": sd["norm_f.weight"], "transformer.ln_f.bias": _or_zeros(sd.get("norm_f.bias"), D)}
    for i in range(cfg.n_layers):
        s, h = f"blocks.{i}.", f"transformer.h.{i}."
        for ours, theirs in (("norm1", "ln_1"), ("norm2", "ln_2")):
            out[h + theirs + ".weight"] = sd[s + ours + ".weight"]
            out[h + theirs + ".bias"] = _or_zeros(sd.get(s + ours + ".bias"), D)
        for ours, theirs, width in (("attn.qkv", "attn.c_attn", 3 * D), ("attn.proj", "attn.c_proj", D),
                                    ("ffn.fc_in", "mlp.c_fc", cfg.ffn_hidden), ("ffn.fc_out", "mlp.c_proj", D)):
            out[h + theirs + ".weight"] = sd[s + ours + ".weight"].t()
            out[h + theirs + ".bias"] = _or_zeros(sd.get(s + ours + ".bias"), width)
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["head.weight"]
    return out


# --- Llama / Mixtral ---------------------------------------------------------------------------------
def llama_config(cfg: ModelConfig) -> dict:
    return {**_common(cfg), "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": cfg.d_model, "intermediate_size": cfg.ffn_hidden, "num_hidden_layers": cfg.n_layers,
            "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_heads, "head_dim": cfg.head_dim,
            "hidden_act": "silu", "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
            "rope_theta": cfg.rope_base, "rope_scaling": None, "attention_bias": False, "mlp_bias": False,
            "attention_dropout": 0.0}


def mixtral_config(cfg: ModelConfig) -> dict:
    out = llama_config(cfg)
    for key in ("mlp_bias", "rope_scaling"):
        out.pop(key)
    out.update(architectures=["MixtralForCausalLM"], model_type="mixtral", intermediate_size=cfg.moe.d_ffn or cfg.ffn_hidden,
               num_local_experts=cfg.moe.num_experts, num_experts_per_tok=cfg.moe.top_k, router_jitter_noise=0.0,
               output_router_logits=False, router_aux_loss_coef=0.0, sliding_window=None)
    return out


def llama_weights(cfg: ModelConfig, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    D = cfg.d_model
    out = {"model.embed_tokens.weight": sd["tok_emb.weight"], "model.norm.weight": sd["norm_f.weight"]}
    for i in range(cfg.n_layers):
        s, h = f"blocks.{i}.", f"model.layers.{i}."
        q, k, v = sd[s + "attn.qkv.weight"].split(D, dim=0)
        out.update({h + "self_attn.q_proj.weight": q, h + "self_attn.k_proj.weight": k,
                    h + "self_attn.v_proj.weight": v, h + "self_attn.o_proj.weight": sd[s + "attn.proj.weight"],
                    h + "input_layernorm.weight": sd[s + "norm1.weight"],
                    h + "post_attention_layernorm.weight": sd[s + "norm2.weight"]})
        if cfg.ffn == "dense":
            out.update({h + "mlp.gate_proj.weight": sd[s + "ffn.fc_gate.weight"],
                        h + "mlp.up_proj.weight": sd[s + "ffn.fc_in.weight"],
                        h + "mlp.down_proj.weight": sd[s + "ffn.fc_out.weight"]})
        else:  # Mixtral: w1 gate, w3 up, w2 down, each nn.Linear (out, in)
            m = h + "block_sparse_moe."
            out[m + "gate.weight"] = sd[s + "ffn.router.weight"]
            for e in range(cfg.moe.num_experts):
                out[f"{m}experts.{e}.w1.weight"] = sd[s + "ffn.expert_wg"][e].t()
                out[f"{m}experts.{e}.w3.weight"] = sd[s + "ffn.expert_w1"][e].t()
                out[f"{m}experts.{e}.w2.weight"] = sd[s + "ffn.expert_w2"][e].t()
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["head.weight"]
    return out


# --- remote code --------------------------------------------------------------------------------------
REMOTE_FILES = ("configuration_somoe.py", "modeling_somoe.py")
AUTO_MAP = {"AutoConfig": "configuration_somoe.SomoeConfig", "AutoModelForCausalLM": "modeling_somoe.SomoeForCausalLM"}
_SOME_STATE = ("query.", "query_center", "log_tau", "out_scale", "expert_w1", "expert_b1", "expert_w2", "expert_b2",
               "lora_", "query_norm.", "selection_bias")
_MOE_STATE = ("router.weight", "expert_")


def remote_config(cfg: ModelConfig, model) -> dict:
    out = {**_common(cfg), "architectures": ["SomoeForCausalLM"], "model_type": "somoe", "auto_map": AUTO_MAP,
           "backbone": cfg.backbone, "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers,
           "num_attention_heads": cfg.n_heads, "max_position_embeddings": cfg.max_seq_len,
           "positions": cfg.positions, "rope_base": cfg.rope_base, "tie_head": cfg.tie_embeddings,
           "tie_word_embeddings": False, "bias": cfg.bias, "norm_eps": cfg.norm_eps, "ffn": cfg.ffn,
           "ffn_hidden": cfg.ffn_hidden, "activation": cfg.activation}
    if cfg.ffn == "moe":
        m = cfg.moe
        out["moe"] = {"num_experts": m.num_experts, "top_k": m.top_k, "d_ffn": m.d_ffn or cfg.ffn_hidden,
                      "capacity_factor": m.capacity_factor}
    if cfg.ffn == "some":
        s = cfg.some
        layer = model.blocks[0].ffn
        out["some"] = {"num_experts": s.num_experts, "top_k": layer.top_k_now, "d_ffn": s.d_ffn,
                       "expert_bias": s.expert_bias, "query_net": s.query_net, "query_hidden": s.query_hidden,
                       "center_queries": s.center_queries, "cosine_scores": s.cosine_scores,
                       "temperature": s.router_temperature_eval, "log_tau": layer.log_tau is not None,
                       "layer_scale": s.layer_scale > 0, "lora_rank": s.lora_rank, "lora_alpha": s.lora_alpha,
                       "expert_dtype": {"fp32": "float32", "bf16": "bfloat16"}[s.expert_dtype],
                       "router": s.router, "expert_storage": s.expert_storage}
        if s.router == "product":
            out["some"].update(pk_heads=s.pk_heads, pk_dim=s.subkey_dim(cfg.d_model),
                               selection_bias=s.selection_bias_rate > 0, query_batchnorm=s.query_batchnorm)
        if s.expert_storage == "procedural":  # regenerated by the remote code, checked against these digests
            from ..models.ffn.some_procedural import GENERATOR_VERSION

            out["some"].update(init_method=s.init_method, sparsity=s.sparsity, expert_seed=s.expert_seed,
                               sign_bank_rows=s.sign_bank_rows, generator=GENERATOR_VERSION,
                               procedural_digest={str(i): int(b.ffn.expert_hash[0]) for i, b in enumerate(model.blocks)})
    return out


def remote_weights(cfg: ModelConfig, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """somoe's names under ``transformer.``; of an FFN's state only what inference reads."""
    out = {}
    for key, t in sd.items():
        if key == "head.weight":
            if not cfg.tie_embeddings:
                out["lm_head.weight"] = t
            continue
        if ".ffn." in key and cfg.ffn in ("moe", "some"):
            local = key.split(".ffn.", 1)[1]
            keep = _SOME_STATE if cfg.ffn == "some" else _MOE_STATE
            if not local.startswith(keep):
                continue
        out["transformer." + key] = t
    if cfg.ffn == "some":
        route = "key_route" if cfg.some.key_ema > 0 else "key_store"
        for i in range(cfg.n_layers):
            out[f"transformer.blocks.{i}.ffn.keys"] = sd[f"blocks.{i}.ffn.{route}"]
    return out


def expert_sha256(weights: dict[str, torch.Tensor], n_layers: int) -> dict[str, str]:
    """Per layer, sha256 over the frozen expert tensors (name, raw bytes), as ``modeling_somoe`` checks it."""
    out = {}
    for i in range(n_layers):
        h = hashlib.sha256()
        for name in ("expert_w1", "expert_b1", "expert_w2", "expert_b2"):
            t = weights.get(f"transformer.blocks.{i}.ffn.{name}")
            if t is not None:
                h.update(name.encode())
                h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        out[str(i)] = h.hexdigest()
    return out


def build(cfg: ModelConfig, model) -> tuple[str | None, dict, dict[str, torch.Tensor]]:
    """(native class or None, config.json dict, safetensors weights) of a loaded somoe ``LM``."""
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    for name, buf in model.named_buffers():  # frozen experts saved as a seed are buffers left out of state_dict
        if ".expert_" in name:
            sd[name] = buf.detach().cpu()
    native = native_class(cfg)
    if native == "GPT2LMHeadModel":
        return native, gpt2_config(cfg), gpt2_weights(cfg, sd)
    if native == "LlamaForCausalLM":
        return native, llama_config(cfg), llama_weights(cfg, sd)
    if native == "MixtralForCausalLM":
        return native, mixtral_config(cfg), llama_weights(cfg, sd)
    config = remote_config(cfg, model)
    weights = remote_weights(cfg, sd)
    if cfg.ffn == "some" and cfg.some.expert_storage == "stored":
        config["expert_sha256"] = expert_sha256(weights, cfg.n_layers)
    return None, config, weights
