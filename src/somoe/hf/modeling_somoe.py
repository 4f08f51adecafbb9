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
the sha256 of each layer's expert tensors, checked after ``from_pretrained``. Procedural experts
(``some.expert_storage: procedural``) are not stored: each routed expert is regenerated from integer
hashes of (seed, layer, expert id), and ``some.procedural_digest`` (a digest of a fixed sample of
experts) is checked after ``from_pretrained``. The product-key router (``some.router: product``) picks
each head's top-k pairs of sub-keys from two codebooks.
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


# --- procedural frozen experts (somoe.models.ffn.some_procedural, integer hashes only) -----------

MASK32 = 0xFFFFFFFF


def mix32(x):
    x = (((x >> 16) ^ x) * 0x45D9F3B) & MASK32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & MASK32
    return (x >> 16) ^ x


def stream_key(seed, layer, stream):
    key = mix32((seed & MASK32) ^ 0x9E3779B9)
    key = mix32(key ^ ((seed >> 32) & MASK32))
    key = mix32(key ^ (layer * 0x85EBCA6B & MASK32))
    return mix32(key ^ (stream * 0xC2B2AE35 & MASK32))


def hashed(counter, key):
    return mix32(mix32(counter ^ key) ^ ((key * 0x27D4EB2F) & MASK32))


def uniforms(count, key):
    i = torch.arange(count, dtype=torch.int64)
    hi, lo = hashed(2 * i, key) >> 6, hashed(2 * i + 1, key) >> 5
    return (((hi << 27) + lo).double() + 0.5) / 2.0 ** 53


def gaussians(count, key):
    half = (count + 1) // 2
    u = uniforms(2 * half, key)
    radius, angle = torch.sqrt(-2.0 * torch.log(u[:half])), 2.0 * math.pi * u[half:]
    return torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)])[:count]


def bank_matrix(fan_in, fan_out, method, sparsity, key):
    values = gaussians(fan_in * fan_out, key).view(fan_out, fan_in)
    keep = torch.ones_like(values, dtype=torch.bool)
    zeros = int(round(sparsity * fan_in)) if method == "sparse" else 0
    if zeros > 0:
        u = uniforms(fan_in * fan_out, mix32(key ^ 0x5BD1E995)).view(fan_out, fan_in)
        keep = u > u.kthvalue(zeros, dim=1, keepdim=True).values
    kept = values[keep]
    kept = (kept - kept.mean()) / kept.std(unbiased=False)
    out = torch.zeros_like(values)
    out[keep] = kept / math.sqrt(fan_in * (1.0 - sparsity) if zeros > 0 else fan_in)
    return out.t().contiguous()


class ProceduralExperts:
    """Expert e: ``act(x W1_e) W2_e`` with ``W1_e = diag(a_e) R1 diag(b_e)``, ``W2_e = diag(c_e) R2 diag(o_e)``:
    one matrix pair per layer and four tables of random signs, rows picked by a hash of e. Not a module:
    generated on first use (from_pretrained builds modules on the meta device)."""

    TABLES = (("a", 1), ("b", 2), ("c", 3), ("o", 4))

    def __init__(self, c, d_model, layer):
        self.c, self.d, self.m, self.layer = c, d_model, c["d_ffn"], layer
        self.seed, self.rows = c["expert_seed"], c["sign_bank_rows"]
        self.keys = {name: stream_key(self.seed, layer, stream) for name, stream in self.TABLES}
        self.tensors = None

    def generate(self, device):
        method, sparsity = self.c["init_method"], self.c["sparsity"]
        t = {"r1": bank_matrix(self.d, self.m, method, sparsity, stream_key(self.seed, self.layer, 5)),
             "r2": bank_matrix(self.m, self.d, method, sparsity, stream_key(self.seed, self.layer, 6))}
        signs_key = stream_key(self.seed, self.layer, 7)
        for i, (name, _) in enumerate(self.TABLES):
            width = self.d if name in ("a", "o") else self.m
            bits = hashed(torch.arange(self.rows * width, dtype=torch.int64), mix32(signs_key ^ (i + 1))) & 1
            t[name] = (1.0 - 2.0 * bits.float()).view(self.rows, width)
        self.tensors = {k: v.float().to(device) for k, v in t.items()}

    def rows_of(self, expert):
        return {name: hashed(expert.long(), key) & (self.rows - 1) for name, key in self.keys.items()}

    def weights(self, e):
        t = self.tensors
        r = self.rows_of(torch.tensor([e], device=t["r1"].device))
        a, b, c, o = (t[n][r[n][0]] for n in ("a", "b", "c", "o"))
        return a[:, None] * t["r1"] * b[None, :], c[:, None] * t["r2"] * o[None, :]

    def forward(self, x_TD, idx_TS, gates_TS):
        if self.tensors is None or self.tensors["r1"].device != x_TD.device:
            self.generate(x_TD.device)
        T, S = idx_TS.shape
        t, r = self.tensors, self.rows_of(idx_TS)
        sign = {n: t[n][r[n].reshape(-1)].view(T, S, -1).to(x_TD.dtype) for n in ("a", "b", "c", "o")}
        h = F.gelu(((x_TD.unsqueeze(1) * sign["a"]) @ t["r1"].to(x_TD.dtype)) * sign["b"]) * sign["c"]
        y = (h @ t["r2"].to(x_TD.dtype)) * sign["o"]
        return (y * gates_TS.to(x_TD.dtype).unsqueeze(-1)).sum(1)

    def digest(self):
        c = self.c
        recipe = (f"{c['generator']}|method={c['init_method']}|sparsity={c['sparsity']!r}|seed={self.seed}|"
                  f"layer={self.layer}|E={c['num_experts']}|d={self.d}|d_ffn={self.m}|rows={self.rows}")
        ids = [0, c["num_experts"] - 1] + [int(mix32(i * 0x9E3779B1 & MASK32)) % c["num_experts"] for i in range(14)]
        h = hashlib.sha256(recipe.encode())
        for e in ids:
            for w in self.weights(e):
                h.update(w.detach().float().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return int.from_bytes(h.digest()[:8], "little", signed=True)


class QueryNorm(nn.Module):
    """The trained query BatchNorm, at inference: running statistics and the affine map."""

    def __init__(self, width, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight, self.bias = nn.Parameter(torch.ones(width)), nn.Parameter(torch.zeros(width))
        self.running_mean, self.running_var = frozen(width), frozen(width)

    def forward(self, q):
        return (q - self.running_mean) * torch.rsqrt(self.running_var + self.eps) * self.weight + self.bias


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

    def __init__(self, config, layer_idx=0):
        super().__init__()
        c = config.some
        self.c = c
        E, D, H = c["num_experts"], config.hidden_size, c["d_ffn"]
        self.product = c.get("router") == "product"
        # product keys: each head's query is two halves of pk_dim, scored against its two codebooks of n sub-keys
        self.heads, self.n = c.get("pk_heads", 1), math.isqrt(E)
        Q = 2 * self.heads * c["pk_dim"] if self.product else D
        if c["query_net"] == "linear":
            self.query = nn.Linear(D, Q, bias=True)
        else:
            hidden = c.get("query_hidden") or D
            self.query = nn.Sequential(nn.Linear(D, hidden), nn.GELU(), nn.Linear(hidden, Q))
        self.keys = frozen(2 * self.heads, self.n, c["pk_dim"]) if self.product else frozen(E, D)
        self.query_center = frozen(Q) if c.get("center_queries") else None
        self.query_norm = QueryNorm(Q) if c.get("query_batchnorm") else None
        self.selection_bias = frozen(2 * self.heads, self.n) if c.get("selection_bias") else None
        self.log_tau = frozen() if c.get("log_tau") else None
        self.out_scale = nn.Parameter(torch.zeros(D)) if c.get("layer_scale") else None
        self.procedural = None
        if c.get("expert_storage") == "procedural":
            self.procedural = ProceduralExperts(c, D, layer_idx)
            return
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

    def queries(self, x_TD):
        q = self.query(x_TD.to(next(self.query.parameters()).dtype))
        if self.query_center is not None:
            q = q - self.query_center.to(q.dtype)
        return q if self.query_norm is None else self.query_norm(q)

    def temperature(self):
        return self.c["temperature"] * (1.0 if self.log_tau is None else self.log_tau.exp())

    def product_route(self, x_TD):
        """Each head: the k best sub-keys of either half, then the k best of their k x k sums (the exact
        top-k over all n^2 experts); gates from the unbiased sums over the temperature."""
        T, H, n, k = x_TD.shape[0], self.heads, self.n, self.c["top_k"]
        q = self.queries(x_TD).view(T, 2 * H, -1)
        keys = self.keys.to(q.dtype)
        if self.c["cosine_scores"]:
            s = torch.einsum("tgd,gnd->tgn", F.normalize(q, dim=-1), F.normalize(keys, dim=-1))
        else:
            s = torch.einsum("tgd,gnd->tgn", q, keys) / math.sqrt(q.shape[-1])
        sel = s if self.selection_bias is None else s + self.selection_bias.to(s.dtype)
        cand = sel.topk(k, dim=-1).indices.view(T, H, 2, k)
        s, sel = s.view(T, H, 2, n), sel.view(T, H, 2, n)
        first, second = sel[:, :, 0].gather(-1, cand[:, :, 0]), sel[:, :, 1].gather(-1, cand[:, :, 1])
        best = (first.unsqueeze(-1) + second.unsqueeze(-2)).flatten(2).topk(k, dim=-1).indices
        i, j = cand[:, :, 0].gather(-1, best // k), cand[:, :, 1].gather(-1, best % k)
        logits = s[:, :, 0].gather(-1, i) + s[:, :, 1].gather(-1, j)
        gates = torch.softmax(logits.float() / self.temperature(), dim=-1)
        return (i * n + j).view(T, -1), gates.view(T, -1)

    def scores(self, x_TD):
        q = self.queries(x_TD)
        keys = self.keys.to(q.dtype)
        if self.c["cosine_scores"]:
            s = F.normalize(q, dim=-1) @ F.normalize(keys, dim=-1).t()
        else:
            s = q @ keys.t() / math.sqrt(q.shape[-1])
        return s / self.temperature()

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
        if self.product:
            idx, gates = self.product_route(x_TD)
        else:
            top, idx = self.scores(x_TD).topk(self.c["top_k"], dim=-1)
            gates = torch.softmax(top.float(), dim=-1)
        if self.procedural is not None:
            y = self.procedural.forward(x_TD, idx, gates)
        else:
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
        self.ffn = SoMEFFN(config, layer_idx) if config.ffn == "some" else FFNS[config.ffn](config)

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
        """Refuse frozen experts whose sha256 differs from the one recorded at export (procedural experts:
        regenerated, then their digest compared with the one recorded at export)."""
        expected = self.config.expert_sha256
        for i, block in enumerate(self.transformer.blocks):
            procedural = getattr(block.ffn, "procedural", None)
            if procedural is not None:
                procedural.generate(block.ffn.keys.device)
                recorded = self.config.some["procedural_digest"][str(i)]
                if procedural.digest() != recorded:
                    raise ExpertHashError(
                        f"layer {i}: procedural experts regenerate to digest {procedural.digest()}, the export "
                        f"recorded {recorded} (generator {self.config.some['generator']}); this remote code does "
                        f"not reproduce them, re-export the run")
                continue
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
