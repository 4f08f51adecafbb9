"""Procedural frozen experts: each routed expert's weights computed on demand, never stored.

Expert ``e`` of layer ``l`` is the two-layer MLP ``act(x W1_e) W2_e`` with

    W1_e = diag(a_e) R1 diag(b_e)        (d x m)
    W2_e = diag(c_e) R2 diag(o_e)        (m x d)

``R1`` (d x m) and ``R2`` (m x d) are one random matrix pair per layer drawn with the configured
init method; ``a_e, o_e`` (d signs) and ``b_e, c_e`` (m signs) are rows of four tables of
``sign_bank_rows`` random sign vectors, picked by a counter-based hash of ``(seed, layer, e)`` (a
"hashed gather from a small stored bank with hashed sign flips", docs/some-layer.md). So

* every entry of every expert is distributed as the init method says (a sign flip of a draw from
  it): mean and variance match exactly;
* two distinct experts are uncorrelated: their entries differ by independent random signs per row
  and per column (within a pair that shares a table row, by the other three's);
* nothing per expert is stored: the tables are ``4 x rows x (d or m)`` signs and ``2 d m`` weights a
  layer, whatever ``num_experts`` is.

Computing ``x W1_e`` never forms ``W1_e``: ``((x * a_e) @ R1) * b_e`` is one dense matmul for all the
slots of a batch against the shared ``R1`` (no sort by expert, no grouped kernel), plus elementwise
sign flips; the per-slot cost of generating the expert is four row gathers, not ``2 d m`` draws.

Everything is drawn from integer hashes (``mix32`` below), never ``torch.Generator``: the numbers are
the same on every device, thread count, process and torch version. The hash arithmetic stays below
2^63 in int64 (32-bit values times a 27-bit constant), so it wraps nowhere. Gaussians come from
Box-Muller on hashed uniforms, computed in float64 on the CPU once per layer at construction.

``GENERATOR_VERSION`` names this recipe; a checkpoint records a digest of a fixed sample of
experts (with the version and the layer's settings in it), and a load that regenerates other
numbers is refused.
"""

from __future__ import annotations

import hashlib
import math

import torch
import torch.nn.functional as F
from torch import nn

GENERATOR_VERSION = "somoe-signbank-mix32-v1"
MASK32 = 0xFFFFFFFF
MIX = 0x45D9F3B  # the multiplier of the 32-bit integer hash (< 2^27, so products fit in int64)
# streams of the hash: one per table, and the matrices' own draws
STREAM_A, STREAM_B, STREAM_C, STREAM_O, STREAM_R1, STREAM_R2, STREAM_SIGNS = range(1, 8)
CPU = torch.device("cpu")


def mix32(x):
    """A 32-bit integer hash (two multiply-xorshift rounds) of ints or int64 tensors in [0, 2^32)."""
    x = (((x >> 16) ^ x) * MIX) & MASK32
    x = (((x >> 16) ^ x) * MIX) & MASK32
    return (x >> 16) ^ x


def stream_key(seed: int, layer: int, stream: int) -> int:
    """A 32-bit key per (seed, layer, stream), mixed on the host."""
    key = mix32((seed & MASK32) ^ 0x9E3779B9)
    key = mix32(key ^ ((seed >> 32) & MASK32))
    key = mix32(key ^ (layer * 0x85EBCA6B & MASK32))
    return mix32(key ^ (stream * 0xC2B2AE35 & MASK32))


def hashed(counter: torch.Tensor, key: int) -> torch.Tensor:
    """32-bit hashes of int64 counters (< 2^32) under a stream key."""
    return mix32(mix32(counter ^ key) ^ ((key * 0x27D4EB2F) & MASK32))


def uniforms(count: int, key: int) -> torch.Tensor:
    """``count`` float64 uniforms in (0, 1) from 53 hashed bits each (CPU)."""
    i = torch.arange(count, dtype=torch.int64, device=CPU)
    hi, lo = hashed(2 * i, key) >> 6, hashed(2 * i + 1, key) >> 5  # 26 + 27 bits
    return (((hi << 27) + lo).double() + 0.5) / 2.0 ** 53


def gaussians(count: int, key: int) -> torch.Tensor:
    """``count`` standard normals (float64, CPU), Box-Muller on hashed uniforms."""
    half = (count + 1) // 2
    u = uniforms(2 * half, key)
    radius, angle = torch.sqrt(-2.0 * torch.log(u[:half])), 2.0 * math.pi * u[half:]
    return torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)])[:count]


def bank_matrix(fan_in: int, fan_out: int, method: str, sparsity: float, key: int) -> torch.Tensor:
    """A ``fan_in x fan_out`` frozen matrix (float64, CPU), variance-preserving like ``some_experts``:
    ``normal``: std 1/sqrt(fan_in); ``sparse``: round(sparsity * fan_in) exact zeros per column at hashed
    rows, the rest Gaussian with std 1/sqrt(fan_in (1 - sparsity)).

    Every expert of a layer flips the signs of this one matrix, so its sample's mean and spread would be
    every expert's: the non-zero entries are standardised to exactly zero mean and the target std (a
    finite sample of 2k values is otherwise ~2% off)."""
    values = gaussians(fan_in * fan_out, key).view(fan_out, fan_in)
    keep = torch.ones_like(values, dtype=torch.bool)
    zeros = int(round(sparsity * fan_in)) if method == "sparse" else 0
    if zeros > 0:
        u = uniforms(fan_in * fan_out, mix32(key ^ 0x5BD1E995)).view(fan_out, fan_in)
        keep = u > u.kthvalue(zeros, dim=1, keepdim=True).values
    kept = values[keep]
    kept = (kept - kept.mean()) / kept.std(unbiased=False)
    std = 1.0 / math.sqrt(fan_in * (1.0 - sparsity)) if zeros > 0 else 1.0 / math.sqrt(fan_in)
    out = torch.zeros_like(values)
    out[keep] = kept * std
    return out.t().contiguous()


def sign_table(rows: int, width: int, key: int) -> torch.Tensor:
    """``rows x width`` random signs (+1/-1, float32, CPU), one hashed bit each."""
    bits = hashed(torch.arange(rows * width, dtype=torch.int64, device=CPU), key) & 1
    return (1.0 - 2.0 * bits.float()).view(rows, width)


class ProceduralExperts(nn.Module):
    """The experts of one SoME layer as a function of their ids (see the module docstring).

    Buffers are regenerated at construction (non-persistent): the checkpoint keeps only the digest.
    """

    TABLES = {"a": STREAM_A, "b": STREAM_B, "c": STREAM_C, "o": STREAM_O}

    def __init__(self, num_experts: int, d_model: int, d_ffn: int, method: str, sparsity: float, seed: int,
                 layer: int, rows: int):
        super().__init__()
        self.num_experts, self.d_model, self.d_ffn, self.rows = num_experts, d_model, d_ffn, rows
        self.method, self.sparsity, self.seed, self.layer = method, sparsity, seed, layer
        self._keys = {name: stream_key(seed, layer, stream) for name, stream in self.TABLES.items()}
        widths = {"a": d_model, "b": d_ffn, "c": d_ffn, "o": d_model}
        for name, width in widths.items():
            self.register_buffer(f"signs_{name}", torch.empty(rows, width), persistent=False)
        self.register_buffer("r1", torch.empty(d_model, d_ffn), persistent=False)
        self.register_buffer("r2", torch.empty(d_ffn, d_model), persistent=False)

    def _apply(self, fn, recurse: bool = True):
        self.__dict__.pop("_converted", None)  # moved or cast: convert again from the buffers
        return super()._apply(fn, recurse)

    @torch.no_grad()
    def generate(self) -> None:
        """Fill the tables and matrices (on the CPU, then copied to wherever the buffers live)."""
        self.__dict__.pop("_converted", None)
        d, m = self.d_model, self.d_ffn
        self.r1.copy_(bank_matrix(d, m, self.method, self.sparsity, stream_key(self.seed, self.layer, STREAM_R1)))
        self.r2.copy_(bank_matrix(m, d, self.method, self.sparsity, stream_key(self.seed, self.layer, STREAM_R2)))
        signs_key = stream_key(self.seed, self.layer, STREAM_SIGNS)
        for i, name in enumerate(self.TABLES):
            table = getattr(self, f"signs_{name}")
            table.copy_(sign_table(self.rows, table.shape[1], mix32(signs_key ^ (i + 1))))

    def table_rows(self, expert: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each table's row for every expert id (any shape, int64, any device): integer ops only."""
        expert = expert.long()
        return {name: hashed(expert, key) & (self.rows - 1) for name, key in self._keys.items()}

    def forward(self, x_TD: torch.Tensor, expert_TS: torch.Tensor, gates_TS: torch.Tensor) -> torch.Tensor:
        """``sum_s gates[t, s] * Expert_{expert[t, s]}(x_t)`` for S slots per token (any gate dtype)."""
        T, S = expert_TS.shape
        rows = {name: r.reshape(-1) for name, r in self.table_rows(expert_TS).items()}
        # the autocast dtype inside autocast (bf16 matmuls on the CPU's AMX), else the input's
        dtype = torch.get_autocast_dtype(x_TD.device.type) if torch.is_autocast_enabled(x_TD.device.type) else x_TD.dtype
        tables = self._tables(dtype)

        def signs(name: str) -> torch.Tensor:  # (T, S, width)
            return tables[name].index_select(0, rows[name]).view(T, S, -1)

        with torch.autocast(x_TD.device.type, enabled=False):
            x_TSD = x_TD.to(dtype).unsqueeze(1) * signs("a")  # x diag(a_e), every slot at once
            h_TSM = F.gelu((x_TSD @ tables["r1"]) * signs("b")) * (signs("c") * gates_TS.to(dtype).unsqueeze(-1))
            y_TSD = (h_TSM @ tables["r2"]) * signs("o")
            return y_TSD.sum(1)

    def _tables(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The sign tables and matrices in the compute dtype, converted once per dtype and device (signs are
        exact in any float dtype)."""
        key = (dtype, self.r1.device)
        cached = self.__dict__.get("_converted")
        if cached is None or cached[0] != key:
            tensors = {name: getattr(self, f"signs_{name}").to(dtype) for name in self.TABLES}
            tensors.update(r1=self.r1.to(dtype), r2=self.r2.to(dtype))
            cached = self.__dict__["_converted"] = (key, tensors)
        return cached[1]

    @torch.no_grad()
    def expert_weights(self, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W1_e, W2_e)`` of one expert, formed explicitly (tests, export, the digest)."""
        rows = self.table_rows(torch.tensor([expert], device=self.r1.device))
        a, b, c, o = (getattr(self, f"signs_{n}")[rows[n][0]] for n in ("a", "b", "c", "o"))
        return a[:, None] * self.r1 * b[None, :], c[:, None] * self.r2 * o[None, :]

    def sample_ids(self, count: int = 16) -> list[int]:
        """A fixed spread of expert ids (first, last and hashed ones) that the digest covers."""
        ids = [0, self.num_experts - 1]
        ids += [int(mix32(i * 0x9E3779B1 & MASK32)) % self.num_experts for i in range(count - 2)]
        return ids

    def recipe(self) -> str:
        return (f"{GENERATOR_VERSION}|method={self.method}|sparsity={self.sparsity!r}|seed={self.seed}|"
                f"layer={self.layer}|E={self.num_experts}|d={self.d_model}|d_ffn={self.d_ffn}|rows={self.rows}")

    def digest(self) -> int:
        """Signed int64 of sha256(recipe, then the fp32 bytes of the sampled experts' weights)."""
        h = hashlib.sha256(self.recipe().encode())
        for e in self.sample_ids():
            for w in self.expert_weights(e):
                h.update(w.detach().float().cpu().contiguous().view(torch.uint8).numpy())
        return int.from_bytes(h.digest()[:8], "little", signed=True)

    def param_count(self) -> int:
        """Frozen parameters the experts stand for (none of them held)."""
        return self.num_experts * 2 * self.d_model * self.d_ffn
