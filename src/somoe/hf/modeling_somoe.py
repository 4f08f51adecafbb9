"""An exported somoe language model for Hugging Face ``transformers`` (remote code).

Copied into every remote-code export; imports only torch and transformers. It is an
independent re-implementation of somoe's inference forward (``somoe.models``): the
two are compared logit for logit by somoe's tests. Module and weight names follow
somoe's own (``transformer.blocks.0.attn.qkv.weight`` ...), so the export is a rename.

Backbones: ``gpt2`` (LayerNorm, biases, learned/sinusoidal/RoPE/no positions) and
``smollm`` (RMSNorm, RoPE, SwiGLU, no biases). FFNs: ``dense``; ``moe`` (top-k of the
router logits, softmax over the kept k, optional expert capacity); ``some`` (a query
network scores tokens against self-organized keys, top-k experts with softmax gates,
frozen random experts, optional LoRA adapters and LayerScale). Training-only parts
(router noise, the keys' update rules, auxiliary losses) are not here.

Frozen SoME experts are stored in ``model.safetensors``; ``config.expert_sha256`` holds
the sha256 of each layer's expert tensors, checked after ``from_pretrained``.
"""

import hashlib
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_somoe import SomoeConfig


# the output's KV-cache field: ``past_key_values`` in transformers 4.x, ``cache`` in later 5.x releases
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class ExpertHashError(RuntimeError):
    """Frozen expert weights that differ from the ones the model was exported with."""


# --- building blocks --------------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def build_norm(config):
    if config.backbone == "smollm":
        return RMSNorm(config.hidden_size, config.norm_eps)
    return nn.LayerNorm(config.hidden_size, eps=config.norm_eps, bias=config.bias)


def activation(name):
    return {"gelu": F.gelu, "relu": F.relu}[name]


def rotary_tables(position_ids, head_dim, base):
    """cos/sin of shape (B, 1, T, head_dim/2) for integer positions (B, T)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=position_ids.device) / head_dim))
    angles = position_ids.float()[..., None] * inv_freq
    return angles.cos().unsqueeze(1), angles.sin().unsqueeze(1)


def apply_rotary(x, cos, sin):
    """Rotate (first half, second half) pairs of each head vector (GPT-NeoX / LLaMA layout)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def sinusoidal_positions(position_ids, dim):
    """Vaswani et al.'s fixed table at ``position_ids``: sin on even channels, cos on odd ones."""
    inv = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32, device=position_ids.device)
                    * (-math.log(10000.0) / dim))
    angles = position_ids.float()[..., None] * inv
    table = torch.zeros(*position_ids.shape, dim, device=position_ids.device)
    table[..., 0::2] = torch.sin(angles)
    table[..., 1::2] = torch.cos(angles[..., : dim // 2])
    return table


def attention_bias(attention_mask, q_len, kv_len, dtype, device):
    """Additive (B|1, 1, q_len, kv_len) mask: causal, padding keys hidden, a query always sees itself."""
    past = kv_len - q_len
    q_pos = torch.arange(past, kv_len, device=device)
    k_pos = torch.arange(kv_len, device=device)
    allowed = (k_pos[None, :] <= q_pos[:, None])[None, None]
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, :kv_len].bool()
    allowed = allowed | (k_pos[None, :] == q_pos[:, None])[None, None]
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, float("-inf"))


class Attention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        bias = config.bias and config.backbone == "gpt2"
        d = config.hidden_size
        self.n_heads, self.head_dim, self.layer_idx = config.num_attention_heads, d // config.num_attention_heads, layer_idx
        self.qkv = nn.Linear(d, 3 * d, bias=bias)
        self.proj = nn.Linear(d, d, bias=bias)

    def forward(self, x, rope, mask, cache):
        B, T, D = x.shape
        q, k, v = self.qkv(x).split(D, dim=2)
        q, k, v = (t.view(B, T, self.n_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))


# --- FFNs ---------------------------------------------------------------------------------------
class DenseFFN(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.swiglu = config.activation == "swiglu"
        bias = config.bias and not self.swiglu
        d, h = config.hidden_size, config.ffn_hidden
        self.fc_in = nn.Linear(d, h, bias=bias)
        self.fc_gate = nn.Linear(d, h, bias=False) if self.swiglu else None
        self.fc_out = nn.Linear(h, d, bias=bias)
        self.act = None if self.swiglu else activation(config.activation)

    def forward(self, x):
        h = F.silu(self.fc_gate(x)) * self.fc_in(x) if self.swiglu else self.act(self.fc_in(x))
        return self.fc_out(h)


def frozen(*shape, dtype=None):
    return nn.Parameter(torch.zeros(shape, dtype=dtype), requires_grad=False)


def combine(x_TD, idx_TK, gates_TK, expert_fn, num_experts):
    """``sum_j gates_tj * expert_{idx_tj}(x_t)``, expert by expert (accumulated in fp32)."""
    out = torch.zeros(x_TD.shape, dtype=torch.promote_types(x_TD.dtype, torch.float32), device=x_TD.device)
    for e in torch.unique(idx_TK).tolist():
        tok, slot = (idx_TK == e).nonzero(as_tuple=True)
        y = expert_fn(e, x_TD[tok]) * gates_TK[tok, slot].to(x_TD.dtype).unsqueeze(1)
        out.index_add_(0, tok, y.to(out.dtype))
    return out.to(x_TD.dtype)


def capacity_keep(idx_TK, num_experts, capacity_factor):
    """Slots within ``ceil(cf*T*k/E)`` per expert, first choices first, then token order."""
    T, K = idx_TK.shape
    capacity = math.ceil(capacity_factor * T * K / num_experts)
    flat = idx_TK.t().reshape(-1)
    keep = torch.zeros_like(flat, dtype=torch.bool)
    for e in range(num_experts):
        where = (flat == e).nonzero(as_tuple=True)[0]
        keep[where[:capacity]] = True
    return keep.view(K, T).t()


class MoEFFN(nn.Module):
    """Top-k of the router logits, softmax over the kept k (noise is a training-time device)."""

    def __init__(self, config):
        super().__init__()
        c = config.moe
        self.num_experts, self.top_k, self.capacity_factor = c["num_experts"], c["top_k"], c.get("capacity_factor", 0.0)
        E, D, H = self.num_experts, config.hidden_size, c["d_ffn"]
        self.swiglu = config.activation == "swiglu"
        bias = config.bias and not self.swiglu
        self.router = nn.Linear(D, E, bias=False)
        self.expert_w1 = nn.Parameter(torch.zeros(E, D, H))
        self.expert_wg = nn.Parameter(torch.zeros(E, D, H)) if self.swiglu else None
        self.expert_w2 = nn.Parameter(torch.zeros(E, H, D))
        self.expert_b1 = nn.Parameter(torch.zeros(E, H)) if bias else None
        self.expert_b2 = nn.Parameter(torch.zeros(E, D)) if bias else None
        self.act = None if self.swiglu else activation(config.activation)

    def expert(self, e, x):
        if self.swiglu:
            return (F.silu(x @ self.expert_wg[e]) * (x @ self.expert_w1[e])) @ self.expert_w2[e]
        h = x @ self.expert_w1[e] + (self.expert_b1[e] if self.expert_b1 is not None else 0)
        return self.act(h) @ self.expert_w2[e] + (self.expert_b2[e] if self.expert_b2 is not None else 0)

    def forward(self, x):
        x_TD = x.reshape(-1, x.shape[-1])
        logits = F.linear(x_TD.float(), self.router.weight.float())
        top, idx = logits.topk(self.top_k, dim=-1)
        gates = torch.softmax(top, dim=-1)
        if self.capacity_factor > 0:
            gates = gates * capacity_keep(idx, self.num_experts, self.capacity_factor)
        return combine(x_TD, idx, gates, self.expert, self.num_experts).view_as(x)


class SoMEFFN(nn.Module):
    """Score a query against the keys, keep the top k, mix frozen experts with softmax gates."""

    EXPERT_TENSORS = ("expert_w1", "expert_b1", "expert_w2", "expert_b2")

    def __init__(self, config):
        super().__init__()
        c = config.some
        self.c = c
        E, D, H = c["num_experts"], config.hidden_size, c["d_ffn"]
        if c["query_net"] == "linear":
            self.query = nn.Linear(D, D, bias=True)
        else:
            hidden = c.get("query_hidden") or D
            self.query = nn.Sequential(nn.Linear(D, hidden), nn.GELU(), nn.Linear(hidden, D))
        self.keys = frozen(E, D)
        self.query_center = frozen(D) if c.get("center_queries") else None
        self.log_tau = frozen() if c.get("log_tau") else None
        self.out_scale = nn.Parameter(torch.zeros(D)) if c.get("layer_scale") else None
        dtype = getattr(torch, c.get("expert_dtype", "float32"))  # stored and computed at the exported dtype
        self.expert_w1, self.expert_w2 = frozen(E, D, H, dtype=dtype), frozen(E, H, D, dtype=dtype)
        self.expert_b1 = frozen(E, H, dtype=dtype) if c.get("expert_bias") else None
        self.expert_b2 = frozen(E, D, dtype=dtype) if c.get("expert_bias") else None
        r = c.get("lora_rank", 0)
        if r:
            self.lora_a1, self.lora_b1 = nn.Parameter(torch.zeros(E, D, r)), nn.Parameter(torch.zeros(E, r, H))
            self.lora_a2, self.lora_b2 = nn.Parameter(torch.zeros(E, H, r)), nn.Parameter(torch.zeros(E, r, D))
            self.lora_scale = c["lora_alpha"] / r

    def expert_digest(self):
        """sha256 over the frozen expert tensors (name, then raw bytes), as the export recorded it."""
        h = hashlib.sha256()
        for name in self.EXPERT_TENSORS:
            t = getattr(self, name)
            if t is not None:
                h.update(name.encode())
                h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def scores(self, x_TD):
        q = self.query(x_TD.to(next(self.query.parameters()).dtype))
        if self.query_center is not None:
            q = q - self.query_center.to(q.dtype)
        keys = self.keys.to(q.dtype)
        if self.c["cosine_scores"]:
            s = F.normalize(q, dim=-1) @ F.normalize(keys, dim=-1).t()
        else:
            s = q @ keys.t() / math.sqrt(q.shape[-1])
        tau = self.c["temperature"] * (1.0 if self.log_tau is None else self.log_tau.exp())
        return s / tau

    def expert(self, e, x):
        w1, w2 = self.expert_w1[e], self.expert_w2[e]
        x = x.to(w1.dtype)
        h = x @ w1 + (self.expert_b1[e] if self.expert_b1 is not None else 0)
        if hasattr(self, "lora_a1"):
            h = h + self.lora_scale * ((x @ self.lora_a1[e].to(x.dtype)) @ self.lora_b1[e].to(x.dtype))
        h = F.gelu(h)
        y = h @ w2 + (self.expert_b2[e] if self.expert_b2 is not None else 0)
        if hasattr(self, "lora_a2"):
            y = y + self.lora_scale * ((h @ self.lora_a2[e].to(h.dtype)) @ self.lora_b2[e].to(h.dtype))
        return y

    def forward(self, x):
        x_TD = x.reshape(-1, x.shape[-1])
        top, idx = self.scores(x_TD).topk(self.c["top_k"], dim=-1)
        gates = torch.softmax(top.float(), dim=-1)
        y = combine(x_TD, idx, gates, self.expert, self.c["num_experts"])
        if self.out_scale is not None:
            y = y * self.out_scale.to(y.dtype)
        return y.view_as(x)


FFNS = {"dense": DenseFFN, "moe": MoEFFN, "some": SoMEFFN}


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.norm1 = build_norm(config)
        self.attn = Attention(config, layer_idx)
        self.norm2 = build_norm(config)
        self.ffn = FFNS[config.ffn](config)

    def forward(self, x, rope, mask, cache):
        x = x + self.attn(self.norm1(x), rope, mask, cache)
        return x + self.ffn(self.norm2(x))


class Transformer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.hidden_size)
        if config.positions == "learned":
            self.pos_emb = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm_f = build_norm(config)

    def forward(self, input_ids, position_ids, mask, cache):
        c = self.config
        x = self.tok_emb(input_ids)
        if c.positions == "learned":
            x = x + self.pos_emb(position_ids)
        elif c.positions == "sinusoidal":
            x = x + sinusoidal_positions(position_ids, c.hidden_size).to(x.dtype)
        rope = rotary_tables(position_ids, c.hidden_size // c.num_attention_heads, c.rope_base) \
            if c.positions == "rope" else None
        for block in self.blocks:
            x = block(x, rope, mask, cache)
        return self.norm_f(x)


class SomoePreTrainedModel(PreTrainedModel):
    config_class = SomoeConfig
    base_model_prefix = "transformer"
    _no_split_modules = ["Block"]
    _supports_cache_class = True
    _supports_sdpa = True

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0.0, 0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, 0.0, 0.02)


class SomoeForCausalLM(SomoePreTrainedModel, GenerationMixin):
    def __init__(self, config):
        super().__init__(config)
        self.transformer = Transformer(config)
        self.lm_head = None if config.tie_head else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        model = super().from_pretrained(*args, **kwargs)
        if isinstance(model, tuple):  # output_loading_info=True
            model[0].verify_experts()
        else:
            model.verify_experts()
        return model

    def verify_experts(self):
        """Refuse frozen experts whose sha256 differs from the one recorded at export."""
        expected = self.config.expert_sha256
        for i, block in enumerate(self.transformer.blocks):
            if not isinstance(block.ffn, SoMEFFN) or str(i) not in expected:
                continue
            if block.ffn.expert_w1.dtype != getattr(torch, self.config.some.get("expert_dtype", "float32")):
                raise ExpertHashError(
                    f"layer {i}: frozen experts loaded as {block.ffn.expert_w1.dtype}, exported as "
                    f"{self.config.some.get('expert_dtype')}; load with dtype={self.config.some.get('expert_dtype')}")
            digest = block.ffn.expert_digest()
            if digest != expected[str(i)]:
                raise ExpertHashError(
                    f"layer {i}: frozen expert weights hash to {digest[:16]}..., the export recorded "
                    f"{expected[str(i)][:16]}...; model.safetensors was modified or corrupted, re-export the run")

    def get_input_embeddings(self):
        return self.transformer.tok_emb

    def set_input_embeddings(self, value):
        self.transformer.tok_emb = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache=None, labels=None, return_dict=None, logits_to_keep=0, cache=None, **kwargs):
        # the KV cache arrives as ``past_key_values`` (transformers 4.x) or ``cache`` (5.x)
        B, T = input_ids.shape
        use_cache = self.config.use_cache if use_cache is None else use_cache
        cache = cache if cache is not None else past_key_values
        if use_cache and cache is None:
            cache = DynamicCache()
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            if attention_mask is not None:  # left padding: each row counts only its real tokens
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:past + T]
            else:
                position_ids = torch.arange(past, past + T, device=input_ids.device).expand(B, T)
        if past + T > self.config.max_position_embeddings:
            raise ValueError(f"sequence of {past + T} tokens exceeds max_position_embeddings="
                             f"{self.config.max_position_embeddings}")
        padded = attention_mask is not None and not bool(attention_mask.all())
        mask = None
        if padded or past > 0:
            mask = attention_bias(attention_mask, T, past + T, self.transformer.tok_emb.weight.dtype, input_ids.device)
        h = self.transformer(input_ids, position_ids, mask, cache)
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            h = h[:, -logits_to_keep:]
        weight = self.transformer.tok_emb.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(h, weight)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                   labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: cache if use_cache else None})
