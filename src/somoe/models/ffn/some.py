"""The SoME layer: frozen experts, a trained query network, self-organizing keys.

Specification: docs/some-layer.md. Forward (section 2)::

    q = Q(x); s = score(q, K) / tau; I, sI = topk(s, k_t); g = softmax(sI)
    y = sum_j g_j * Expert_{I_j}(x)        # dropless, models/dispatch/

Keys ``key_store`` never get gradients. Training forwards (not activation-
checkpoint recomputes) only *accumulate* statistics; ``self_organize`` applies
the rules of ``some_rules`` once per optimizer step, after the trainer has
SUM-all-reduced ``som_statistics()`` across ranks, then clears them.

Seeds (all on the CPU, never the global RNG, so every rank agrees without a
broadcast): experts from ``expert_seed + layer_idx`` (see ``some_experts``),
initial keys from ``expert_seed + layer_idx + KEY_SEED_OFFSET``, the token
subsample of ``update_token_fraction`` from ``... + SAMPLE_SEED_OFFSET``
(a stream restarted at construction; which tokens feed the statistics is not
part of a checkpoint).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...config import ModelConfig, SoMEConfig
from ..dispatch import DeviceGroups, LoRA, compute_dtype, dispatch, expert_counts, grouped_mlp, slot_counts
from .. import fp32_matmul
from . import some_rules as rules
from .base import FFN, in_recompute
from .moe import switch_loss
from .registry import register_ffn
from .routing_tally import RoutingTally
from .some_experts import (DTYPES, ExpertHashMismatch, experts_from_cache_or_generate,
                           generate_experts, recipe)
from .some_frozen import FrozenCompute
from .some_procedural import ProceduralExperts
from .some_product import MaskedBatchNorm, ProductRouting
from .some_router import cosine_scores
from .some_update import SAMPLE_SEED_OFFSET, KeyUpdates, from_host

KEY_SEED_OFFSET = 1_000_003
# decay_target=sample: uniforms drawn per key update for this many draws (micro-batches) in a row; a
# step with more gathering forwards reuses them cyclically
DRAW_TABLE = 64


def key_rows_shape(c: SoMEConfig) -> tuple[int, ...]:
    """The leading shape of the key store: ``(E,)`` keys, or ``(G, n)`` sub-keys (G = 2 x heads codebooks)."""
    if c.router == "product":
        return (2 * c.pk_heads, c.subkeys_per_codebook)
    return (c.num_experts,)


def key_width(c: SoMEConfig, d_model: int) -> int:
    return c.subkey_dim(d_model) if c.router == "product" else d_model


def statistic_shapes(c: SoMEConfig, d_model: int) -> dict[str, tuple[int, ...]]:
    """The per-step accumulators (name -> shape); the optional ones exist only when their rule is on,
    so switched-off features cost neither memory nor all-reduce volume. Per key (or sub-key) row ``R``:
    ``R x d`` sums and ``R`` masses and counts; per query ``Q`` (its width) the totals."""
    R, d, Q = key_rows_shape(c), key_width(c, d_model), c.query_width(d_model)
    shapes = {"stat_q_sum": (*R, d), "stat_gate": R, "stat_count": R}
    if c.router == "exhaustive":  # the peer rule (co-selected keys) exists for whole keys only
        shapes.update(stat_peer_sum=(*R, d), stat_peer_mass=R)
    shapes.update(stat_q_total=(Q,), stat_tokens=(), stat_gate_entropy=())
    if c.center_queries:
        shapes["stat_q_raw_total"] = (Q,)
    if c.decay and c.decay_target == "sample":
        shapes.update(stat_q_samples=(*R, d), stat_sample_draws=())
    return shapes


def build_query_net(cfg, d_model: int) -> nn.Module:
    """``linear``: d->Q with bias (what the seeds' parameter counts imply); ``mlp``: d->h->Q, GELU.
    ``Q`` = d_model (exhaustive) or heads x 2 x d_k (product)."""
    hidden, width = cfg.query_hidden_width(d_model), cfg.query_width(d_model)
    if not hidden:
        return nn.Linear(d_model, width, bias=True)
    return nn.Sequential(nn.Linear(d_model, hidden), nn.GELU(), nn.Linear(hidden, width))


@register_ffn("some")
class SoMELayer(KeyUpdates, ProductRouting, FFN):
    """Self-organizing mixture of frozen experts (``model.ffn: some``, settings in ``model.some``)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int = 0):
        super().__init__()
        self.cfg = c = cfg.some  # the evaluator flips cfg.adapt_at_inference on this object
        self.layer_idx, self.d_model = layer_idx, cfg.d_model
        E, D = c.num_experts, cfg.d_model
        self.product = c.router == "product"
        self.query = build_query_net(c, D)
        self.query_norm = MaskedBatchNorm(c.query_width(D)) if self.product and c.query_batchnorm else None
        # LayerScale (Touvron et al., 2021): frozen experts are variance-preserving, so unscaled they
        # would swamp a residual stream initialised at std 0.02; the trained gain lets the model decide
        self.out_scale = nn.Parameter(torch.empty(D)) if c.layer_scale > 0 else None
        if c.learnable_tau:
            self.log_tau = nn.Parameter(torch.zeros(()))
        elif c.entropy_band_on:  # the entropy-band controller alone moves it
            self.register_buffer("log_tau", torch.zeros(()))
        else:
            self.log_tau = None
        self._register_state(D)
        self._frozen = FrozenCompute()  # before the experts: generating them refreshes it
        self.procedural = None
        if c.expert_storage == "procedural":
            self.procedural = ProceduralExperts(E, D, c.d_ffn, c.init_method, c.sparsity, c.expert_seed,
                                                layer_idx, c.sign_bank_rows)
            self.register_buffer("expert_hash", torch.zeros(1, dtype=torch.int64))
        else:
            self._register_experts(E, D)
        self._register_lora(E, D)
        self.gather_always = False
        self.set_progress(0, 0)
        RoutingTally.attach(self, c.num_experts, key_rows_shape(c) if self.product else None)
        self._experts_ready = False
        self._sample_gen = torch.Generator(device="cpu").manual_seed(c.expert_seed + layer_idx + SAMPLE_SEED_OFFSET)
        # Host copy of ``som_updates`` (the key rules and the query-sample seeds read it): reading the
        # buffer at every update would be a host sync. Re-read once after a load.
        self._updates_on_host = 0
        self.register_load_state_dict_pre_hook(self._check_expert_hash)
        self.register_load_state_dict_post_hook(self._after_load)
        self.init_weights()

    # --- construction --------------------------------------------------------------------
    def _register_state(self, D: int) -> None:
        c = self.cfg
        R, d, Q = key_rows_shape(c), key_width(c, D), c.query_width(D)
        self.register_buffer("key_store", torch.empty(*R, d))  # keys (E x D) or sub-key codebooks (G x n x d_k)
        self.register_buffer("usage_ema", torch.empty(R))
        self.register_buffer("query_mean_ema", torch.empty(Q))  # decay target of dormant keys
        if c.center_queries:  # only then: checkpoints of uncentred layers keep their key set
            self.register_buffer("query_center", torch.empty(Q))  # running mean of the raw queries
        self.register_buffer("dormant_streak", torch.empty(R, dtype=torch.int64))  # updates dormant in a row
        self.register_buffer("key_drift", torch.empty(()))  # mean ||dk_e|| of the last update
        self.register_buffer("som_updates", torch.empty((), dtype=torch.int64))
        if c.key_ema > 0:
            self.register_buffer("key_route", torch.empty(*R, d))  # EMA of the keys, used for routing
        if self.product and c.selection_bias_rate > 0:  # loss-free balancing, for selection only
            self.register_buffer("selection_bias", torch.empty(R))
        if self.product:  # experts routed at least once in training: over the run (checkpointed), since the last eval
            self.register_buffer("routed_ever", torch.empty(c.num_experts, dtype=torch.bool))
            self.register_buffer("routed_since_eval", torch.zeros(c.num_experts, dtype=torch.bool), persistent=False)
            self._train_coverage = 0.0
        # the current top-k on the device: a compiled forward reads it as a mask, so one graph serves
        # every k of the top-k warm-up
        self.register_buffer("top_k_live", torch.zeros((), dtype=torch.int64), persistent=False)
        if c.decay and c.decay_target == "sample":  # this update's uniforms (_refresh_draws)
            self.register_buffer("sample_u", torch.zeros(DRAW_TABLE, *R, dtype=torch.float64), persistent=False)
        self._statistics = statistic_shapes(c, D)
        for name, shape in self._statistics.items():
            self.register_buffer(name, torch.empty(shape), persistent=False)

    def _register_experts(self, E: int, D: int) -> None:
        c = self.cfg
        dtype, keep = DTYPES[c.expert_dtype], c.save_experts == "weights"
        shapes = {"w1": (E, D, c.d_ffn), "w2": (E, c.d_ffn, D)}
        if c.expert_bias:
            shapes.update(b1=(E, c.d_ffn), b2=(E, D))
        for name, shape in shapes.items():
            self.register_buffer(f"expert_{name}", torch.empty(shape, dtype=dtype), persistent=keep)
        for name in ("b1", "b2"):
            if not c.expert_bias:
                setattr(self, f"expert_{name}", None)
        self.register_buffer("expert_hash", torch.zeros(1, dtype=torch.int64))

    def _register_lora(self, E: int, D: int) -> None:
        r, F_ = self.cfg.lora_rank, self.cfg.d_ffn
        self.lora_a1 = self.lora_b1 = self.lora_a2 = self.lora_b2 = None
        if r > 0:
            self.lora_a1, self.lora_b1 = nn.Parameter(torch.empty(E, D, r)), nn.Parameter(torch.empty(E, r, F_))
            self.lora_a2, self.lora_b2 = nn.Parameter(torch.empty(E, F_, r)), nn.Parameter(torch.empty(E, r, D))

    @torch.no_grad()
    def init_weights(self) -> None:
        """Keys, usage, LoRA; experts are generated once (the LM calls this again after its own init)."""
        if self.key_store.is_meta:
            return
        c = self.cfg
        gen = torch.Generator(device="cpu").manual_seed(c.expert_seed + self.layer_idx + KEY_SEED_OFFSET)
        keys_ED = F.normalize(torch.randn(self.key_store.shape, generator=gen, device="cpu"), dim=-1)
        self.key_store.copy_(keys_ED)
        if c.key_ema > 0:
            self.key_route.copy_(keys_ED)
        self.usage_ema.fill_(1.0 / self.usage_ema.shape[-1])
        if hasattr(self, "selection_bias"):
            self.selection_bias.zero_()
        if self.product:
            self.routed_ever.zero_()
            self.routed_since_eval.zero_()
        if self.query_norm is not None:
            self.query_norm.running_mean.zero_()
            self.query_norm.running_var.fill_(1.0)
        for name in ("query_mean_ema", "dormant_streak", "key_drift", "som_updates"):
            getattr(self, name).zero_()
        self._updates_on_host = 0
        self._refresh_draws()
        if c.center_queries:
            self.query_center.zero_()
        if self.log_tau is not None:
            self.log_tau.zero_()
        if self.out_scale is not None:
            self.out_scale.fill_(c.layer_scale)
        if self.lora_a1 is not None:  # A small random, B zero: the adapters start as a no-op
            nn.init.normal_(self.lora_a1, std=1.0 / math.sqrt(self.d_model))
            nn.init.normal_(self.lora_a2, std=1.0 / math.sqrt(c.d_ffn))
            nn.init.zeros_(self.lora_b1)
            nn.init.zeros_(self.lora_b2)
        self._clear_statistics()
        if not self._experts_ready:
            self._generate_experts()

    def _recipe(self) -> str:
        c = self.cfg
        if self.procedural is not None:
            return self.procedural.recipe()
        return recipe(c.num_experts, self.d_model, c.d_ffn, c.init_method, c.sparsity,
                      c.expert_seed + self.layer_idx, c.expert_bias, c.expert_dtype)

    def _generate_experts(self) -> None:
        c = self.cfg
        if self.procedural is not None:  # the tables and matrices only; the digest samples some experts
            self.procedural.generate()
            self.expert_hash.fill_(self.procedural.digest())
            self._experts_ready = True
            return
        tensors, digest = experts_from_cache_or_generate(self._recipe(), lambda: generate_experts(
            c.num_experts, self.d_model, c.d_ffn, c.init_method, c.sparsity, c.expert_seed + self.layer_idx,
            c.expert_bias, DTYPES[c.expert_dtype]))
        self.expert_hash.fill_(digest)
        for name, t in tensors.items():
            getattr(self, f"expert_{name}").copy_(t)
        self._experts_ready = True
        self._refresh_frozen()

    def _expert_tensors(self) -> tuple:
        return self.expert_w1, self.expert_b1, self.expert_w2, self.expert_b2

    def _refresh_frozen(self) -> None:
        """Stored experts changed (generated, loaded, moved): the compute copy follows. Procedural experts
        keep their own tables (some_procedural)."""
        if self.procedural is None:
            self._frozen.refresh(self._expert_tensors())

    def prepare_compute(self, x: torch.Tensor) -> None:
        """Before a compiled step traces this layer, eagerly: the frozen experts' copy in the dtype the
        forward computes in (``x``'s, or autocast's: call it inside the run's autocast), see some_frozen."""
        if self.procedural is not None:
            return
        self._frozen.prepare(self._expert_tensors(), compute_dtype(x, self.expert_w1.dtype))

    @staticmethod
    def _after_load(module: "SoMELayer", _incompatible_keys) -> None:
        if module.som_updates.is_meta:
            return
        module._updates_on_host = int(module.som_updates)  # came from the checkpoint: one read, at load
        module._refresh_draws()
        module._refresh_frozen()  # loaded experts (weights checkpoints): the copy follows

    def _check_expert_hash(self, module, state_dict, prefix, *_) -> None:
        """Refuse a seed-only checkpoint whose experts would regenerate differently."""
        saved = state_dict.get(prefix + "expert_hash")
        seed_only = self.cfg.save_experts == "seed" or self.procedural is not None
        if not seed_only or saved is None or self.expert_hash.is_meta:
            return  # weights travel with the checkpoint, or strict loading reports the missing key
        saved, now = int(saved.flatten()[0]), int(self.expert_hash[0])
        if saved != now and self.procedural is not None:
            raise ExpertHashMismatch(
                f"SoME layer {self.layer_idx}: procedural experts of generator {self._recipe()} digest to {now}, "
                f"the checkpoint expects {saved}: it was made by another generator version or other settings; "
                f"load it with the somoe version that trained it")
        if saved != now:
            raise ExpertHashMismatch(
                f"SoME layer {self.layer_idx}: frozen experts regenerated from [{self._recipe()}] hash to {now}, "
                f"the checkpoint expects {saved}; use the run's expert_seed/init_method/sparsity/shapes/"
                f"expert_dtype and torch generator, or train with model.some.save_experts=weights")

    def frozen_param_count(self) -> int:
        """Frozen expert elements held as buffers (``LM.param_counts`` adds them to the total); procedural
        experts hold none (:meth:`procedural_param_count`)."""
        c = self.cfg
        if self.procedural is not None:
            return 0
        per_expert = 2 * self.d_model * c.d_ffn + ((c.d_ffn + self.d_model) if c.expert_bias else 0)
        return c.num_experts * per_expert

    def active_frozen_param_count(self) -> int:
        """Frozen expert elements one token uses: its routed slots' experts (stored biases included)."""
        c = self.cfg
        biases = c.d_ffn + self.d_model if c.expert_bias and self.procedural is None else 0
        return c.slots_per_token * (2 * self.d_model * c.d_ffn + biases)

    def procedural_param_count(self) -> int:
        """Frozen expert elements computed on demand, never held."""
        return 0 if self.procedural is None else self.procedural.param_count()

    # --- routing -------------------------------------------------------------------------
    def set_progress(self, step: int, total_steps: int) -> None:
        # The forward reads only the values derived here, never the step itself: torch.compile
        # guards on every int a forward reads, so reading the step recompiled every step until
        # dynamo's recompile limit sent the rest of training to eager.
        self._total_steps = total_steps
        self._top_k = rules.top_k_at(self.cfg, step, total_steps)
        if not self.top_k_live.is_meta:
            self.top_k_live.fill_(self._top_k)
        # other steps skip the statistics entirely, except in the compiled training step (one graph for every
        # step: it gathers always and discards what an unscheduled step gathered)
        self._gather_now = self.gather_always or step % self.cfg.update_every == 0

    @property
    def top_k_now(self) -> int:
        return self._top_k

    def temperature(self) -> torch.Tensor | float:
        base = self.cfg.router_temperature_train if self.training else self.cfg.router_temperature_eval
        return base if self.log_tau is None else base * self.log_tau.exp()

    def routing_keys(self) -> torch.Tensor:
        return self.key_route if self.cfg.key_ema > 0 else self.key_store

    def _scores(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(scores_TE / tau, the query each score used: centred, then unit-norm when cosine; the raw query).

        With ``router_dtype: fp32`` (the default) the router runs in fp32 even under autocast (d x d
        and T x E: cheap): bf16 cosine scores carry 8 mantissa bits, so near-ties among 128 keys can
        flip top-k choices, and the keys' rules learn from these queries. Over 8 seeds of cpu_some
        (200 steps) the bf16 router was 2-4% faster and +4.5% worse in mean val loss
        (docs/benchmarks.md, "bf16 training of cpu_some").
        """
        if self.cfg.router_dtype == "autocast":
            return self._router_scores(x_TD)
        router_dtype = next(self.query.parameters()).dtype  # fp32 masters under autocast
        with torch.autocast(x_TD.device.type, enabled=False):
            return self._router_scores(x_TD.to(router_dtype))

    def _router_scores(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q_raw_TD = q_TD = fp32_matmul.apply(self.query, x_TD)  # fp32 stays fp32 where TF32 is on
        if self.cfg.center_queries:
            q_TD = q_TD - self.query_center.to(q_TD.dtype)
        keys_ED = self.routing_keys()
        if self.cfg.cosine_scores:
            scores_TE, q_TD = cosine_scores(q_TD, keys_ED, self.temperature())
            return scores_TE, q_TD, q_raw_TD
        scores_TE = fp32_matmul.mm(q_TD, keys_ED.t().to(q_TD.dtype)) / math.sqrt(self.d_model)
        return scores_TE / self.temperature(), q_TD, q_raw_TD

    def _select(self, scores_TE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        top_TK, idx_TK = scores_TE.topk(self.top_k_now, dim=-1)
        return idx_TK, torch.softmax(top_TK.float(), dim=-1)

    def _select_masked(self, scores_TE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The compiled forward's selection: the final ``top_k`` slots, those past the current k (the
        device's ``top_k_live``) with gate exactly 0, and the (K,) mask of live slots. One graph for
        every k of the warm-up; the dead slots are computed (with zero gate) until k reaches top_k."""
        top_TK, idx_TK = scores_TE.topk(self.cfg.top_k, dim=-1)
        live_K = torch.arange(self.cfg.top_k, device=scores_TE.device) < self.top_k_live
        return idx_TK, torch.softmax(top_TK.float().masked_fill(~live_K, float("-inf")), dim=-1), live_K

    @torch.no_grad()
    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert indices and gates (``x.shape[:-1] + (slots,)``: k_t, or heads x k with product keys) under the
        current mode's temperature."""
        if self.product:
            _, _, i_THk, j_THk, logits_THk = self._route_product(x.reshape(-1, self.d_model), None)
            gates_THk = torch.softmax(logits_THk.float() / self.temperature(), dim=-1)
            expert_THk = i_THk * self.cfg.subkeys_per_codebook + j_THk
            return expert_THk.view(*x.shape[:-1], -1), gates_THk.view(*x.shape[:-1], -1)
        scores_TE, _, _ = self._scores(x.reshape(-1, self.d_model))
        idx_TK, gates_TK = self._select(scores_TE)
        return idx_TK.view(*x.shape[:-1], -1), gates_TK.view(*x.shape[:-1], -1)

    # --- forward -------------------------------------------------------------------------
    def _lora(self) -> LoRA | None:
        if self.lora_a1 is None:
            return None
        return LoRA(self.lora_a1, self.lora_b1, self.lora_a2, self.lora_b2, self.cfg.lora_alpha / self.cfg.lora_rank)

    def _experts(self, x_SD: torch.Tensor, counts) -> torch.Tensor:
        # the grouped path (device groups) computes with the cached cast copy; the loop casts per expert
        cast = isinstance(counts, (DeviceGroups, torch.Tensor))
        w1, b1, w2, b2 = self._frozen.experts(self._expert_tensors(), x_SD.dtype, cast)
        return grouped_mlp(x_SD, counts, w1, b1, w2, b2, lora=self._lora())

    def _run_experts(self, x_TD: torch.Tensor, idx_TS: torch.Tensor, gates_TS: torch.Tensor,
                     counts_E: torch.Tensor | None = None) -> torch.Tensor:
        """``sum_s gates[t, s] * Expert_{idx[t, s]}(x_t)``: procedural experts per slot, or the dispatch."""
        if self.procedural is not None:
            return self.procedural(x_TD, idx_TS, gates_TS)
        E = self.cfg.num_experts
        return dispatch(x_TD, idx_TS, gates_TS, self._experts, E, compute_dtype(x_TD, self.expert_w1.dtype),
                        counts_E=expert_counts(idx_TS, E) if counts_E is None else counts_E)

    def forward(self, x_BTD: torch.Tensor, valid_BT: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``valid_BT`` (bool, optional): the positions that count. PAD positions (False) are computed
        like any token (their outputs are never scored) but stay out of every statistic: the key rules'
        accumulators, the usage tallies and readouts, and the aux loss."""
        if self.product:
            return self._forward_product(x_BTD, valid_BT)
        x_TD = x_BTD.reshape(-1, self.d_model)
        scores_TE, q_TD, q_raw_TD = self._scores(x_TD)
        live_K = None
        if torch.compiler.is_compiling() and self.cfg.topk_warmup > 0:
            idx_TK, gates_TK, live_K = self._select_masked(scores_TE)
        else:
            idx_TK, gates_TK = self._select(scores_TE)
        counts_E = expert_counts(idx_TK, self.cfg.num_experts)  # routed slots per expert: the dispatch's
        y_TD = self._run_experts(x_TD, idx_TK, gates_TK, counts_E)
        if self.out_scale is not None:
            y_TD = y_TD * self.out_scale.to(y_TD.dtype)
        weight_T = None if valid_BT is None else valid_BT.reshape(-1).to(torch.float32)
        # the statistics' slots per expert: the dispatch's counts, or only the real tokens' live slots
        counted_E = counts_E
        if weight_T is not None or live_K is not None:
            counted_E = slot_counts(idx_TK, self.cfg.num_experts, weight_T, live_K)
        aux = (self._aux_loss(scores_TE, counted_E, weight_T) if self.training and self.cfg.aux_loss_coef > 0
               else None)
        if not in_recompute():  # a checkpoint recompute has been counted by the first forward
            with torch.no_grad():
                gates32_TK = gates_TK.detach().float()
                entropy = rules.gate_entropy_sum(gates32_TK, weight_T)  # once, for the tally and the rules
                tokens = x_TD.shape[0] if weight_T is None else weight_T.sum()
                self._tally.add_sums(counted_E, entropy, tokens)
                if self._gathering():
                    self._accumulate(q_TD, q_raw_TD, idx_TK, gates32_TK, counted_E, weight_T, entropy, live_K)
        return y_TD.view_as(x_BTD), aux

    def _aux_loss(self, scores_TE: torch.Tensor, counts_E: torch.Tensor,
                  weight_T: torch.Tensor | None = None) -> torch.Tensor:
        """``coef`` times the Switch balance loss on the router's scores (:func:`moe.switch_loss`)."""
        return self.cfg.aux_loss_coef * switch_loss(scores_TE, counts_E, weight_T)

    # --- statistics (section 3) ----------------------------------------------------------
    def _gathering(self) -> bool:
        if self.training:
            return self._gather_now
        return self.cfg.adapt_at_inference

    @torch.no_grad()
    def _accumulate(self, q_TD: torch.Tensor, q_raw_TD: torch.Tensor, idx_TK: torch.Tensor,
                    gates_TK: torch.Tensor, counts_E: torch.Tensor | None = None,
                    weight_T: torch.Tensor | None = None, entropy: torch.Tensor | None = None,
                    live_K: torch.Tensor | None = None) -> None:
        """Add this batch to the step's statistics. Optional, when the forward has them: ``counts_E``
        the counted slots per expert, ``weight_T`` 1 for counted tokens and 0 for PAD, ``entropy`` the
        counted tokens' summed gate entropy, ``live_K`` the live slots of a masked selection."""
        with torch.autocast(q_TD.device.type, enabled=False):  # fp32 sums even inside a bf16 forward
            self._accumulate_fp32(q_TD.detach().float(), q_raw_TD.detach().float(), idx_TK,
                                  gates_TK.detach().float(), counts_E, weight_T, entropy, live_K)

    def _accumulate_fp32(self, q_TD: torch.Tensor, q_raw_TD: torch.Tensor, idx_TK: torch.Tensor,
                         g_TK: torch.Tensor, counts_E: torch.Tensor | None, weight_T: torch.Tensor | None,
                         entropy: torch.Tensor | None, live_K: torch.Tensor | None) -> None:
        if self.cfg.update_token_fraction < 1.0:
            rows = self._token_sample(q_TD.shape[0], q_TD.device)
            q_TD, q_raw_TD, idx_TK, g_TK = q_TD[rows], q_raw_TD[rows], idx_TK[rows], g_TK[rows]
            weight_T = None if weight_T is None else weight_T[rows]
            counts_E = entropy = None  # the forward's sums cover every token, not this sample
        T, K = idx_TK.shape
        E, e_S = self.cfg.num_experts, idx_TK.reshape(-1)
        if weight_T is not None:  # PAD tokens: zero gates, so they add nothing to any gate-weighted sum
            g_TK = g_TK * weight_T.unsqueeze(1)
        if counts_E is None:
            counts_E = (expert_counts(e_S, E) if weight_T is None and live_K is None
                        else slot_counts(idx_TK, E, weight_T, live_K))
        if entropy is None:  # PAD's zeroed gates have zero entropy
            entropy = rules.gate_entropy_sum(g_TK)
        # dense T x E gate matrix (top-k indices are distinct per token): Sq = G^T q is one matmul
        gates_TE = g_TK.new_zeros(T, E).scatter_(1, idx_TK, g_TK)
        fp32_matmul.addmm_(self.stat_q_sum, gates_TE.t(), q_TD)  # the statistics in true fp32 (no TF32)
        self.stat_gate += gates_TE.sum(0)
        self.stat_count += counts_E  # in place: an int64 count promotes into the fp32 accumulator
        if self.cfg.peer and self.cfg.gamma > 0 and K > 1:  # a zero rate needs no peer statistics
            # w[t, j, j'] = g[t, j'] for j' != j: the gate of every co-selected expert, without subtraction
            w_TKK = g_TK.unsqueeze(1) * (1.0 - torch.eye(K, device=g_TK.device))
            if live_K is not None:  # a dead slot (gate 0) has no co-selected experts
                w_TKK = w_TKK * live_K.view(1, K, 1)
            keys_TKD = self.key_store[idx_TK].float()
            self.stat_peer_sum.index_add_(0, e_S, fp32_matmul.mm(w_TKK, keys_TKD).reshape(-1, self.d_model))
            self.stat_peer_mass.index_add_(0, e_S, w_TKK.sum(-1).reshape(-1))
        self.stat_q_total += q_TD.sum(0) if weight_T is None else fp32_matmul.mm(weight_T, q_TD)
        if self.cfg.decay and self.cfg.decay_target == "sample":
            self._draw_query_samples(q_TD, weight_T)
        if self.cfg.center_queries:
            self.stat_q_raw_total += q_raw_TD.sum(0) if weight_T is None else fp32_matmul.mm(weight_T, q_raw_TD)
        self.stat_tokens += T if weight_T is None else weight_T.sum()
        self.stat_gate_entropy += entropy

    # Host RNG and host counters run eagerly under torch.compile: traced, the generator is a graph
    # break and the counters would be guards that recompile at every update.
    @torch.compiler.disable
    def _token_sample(self, T: int, device: torch.device) -> torch.Tensor:
        """The sorted rows of this batch's ``update_token_fraction`` sample (the layer's own stream)."""
        m = max(1, round(self.cfg.update_token_fraction * T))
        return from_host(torch.randperm(T, generator=self._sample_gen, device="cpu")[:m].sort().values, device)

    def _draw_query_samples(self, q_TD: torch.Tensor, weight_T: torch.Tensor | None = None) -> None:
        """One random query per expert (``decay_target=sample``), summed over micro-batches and ranks.

        Draw ``d`` of an update reads row ``d`` of that update's uniforms (:meth:`_refresh_draws`), by
        the device counter ``stat_sample_draws``: a resumed run draws the same rows as an
        uninterrupted one, ranks draw the same ranks of their own batches, and the all-reduced mean
        is a mean of real queries. Each draw is a uniform ``u`` in [0, 1):
        expert ``e`` takes the ``floor(u_e * n)``-th of the ``n`` counted tokens, located on the
        device when PAD tokens are masked (no host read of ``n``), so a padded batch draws the same
        queries as its real tokens alone.
        """
        draw = (self.stat_sample_draws.long() % DRAW_TABLE).view(1)
        u_E = self.sample_u.index_select(0, draw)[0]  # a tensor index: no host read of the counter
        if weight_T is None:
            rows_E = (u_E * q_TD.shape[0]).long()
        else:  # the r-th counted token: the first row whose running count of counted tokens exceeds r
            rank_E = (u_E * weight_T.sum()).floor()
            rows_E = torch.searchsorted(weight_T.double().cumsum(0), rank_E, right=True).clamp_max(q_TD.shape[0] - 1)
        self.stat_q_samples += self._queries_at(q_TD, rows_E)
        self.stat_sample_draws += 1

    def som_statistics(self) -> list[torch.Tensor]:
        """The accumulators, for the trainer's in-place SUM all-reduce."""
        return [getattr(self, name) for name in self._statistics]

    def _clear_statistics(self) -> None:
        for name in self._statistics:
            getattr(self, name).zero_()

    def train(self, mode: bool = True):
        if mode and not self.training:
            self._clear_statistics()  # statistics an adapting eval left unapplied never reach training
        return super().train(mode)

    # --- readouts (section 4) ------------------------------------------------------------
    def reset_readouts(self) -> None:
        self._tally.reset()
        if self.product:  # the evaluator resets before an eval: keep what training routed since the last one
            self._train_coverage = float(self.routed_since_eval.float().mean())
            self.routed_since_eval.zero_()

    def _apply(self, fn, recurse: bool = True):
        self._tally._apply(fn)  # the unregistered tally (RoutingTally.attach) follows .to()/.cuda()
        out = super()._apply(fn, recurse)
        self._refresh_frozen()  # moved or cast experts: the copy follows
        return out

    @torch.no_grad()
    def readouts(self) -> dict[str, float]:
        """Usage inequality and gate entropy since ``reset_readouts``, plus the keys' current state."""
        out = self._tally.summary()
        out.update(self._key_readouts())
        if self.product:
            out["run_coverage"] = float(self.routed_ever.float().mean())  # share of experts training ever routed
            out["train_coverage"] = self._train_coverage  # ... routed by training since the eval before
        out["dormant"] = float((self.dormant_streak > 0).sum())
        out["dormant_streak_max"] = float(self.dormant_streak.max())  # updates in a row, longest
        streaks = self.dormant_streak[self.dormant_streak > 0]
        out["dormant_streak_mean"] = float(streaks.float().mean()) if streaks.numel() else 0.0
        out["key_drift"] = float(self.key_drift)
        out["tau"] = float(self.cfg.router_temperature_train * (1.0 if self.log_tau is None else self.log_tau.exp()))
        out["top_k"] = float(self.top_k_now)
        out["dropped_pct"] = 0.0  # dropless
        return out

    def _key_readouts(self) -> dict[str, float]:
        """Key norms and pairwise cosines (within each codebook, for sub-keys)."""
        keys_GED = self.key_store.float()
        keys_GED = keys_GED if keys_GED.dim() == 3 else keys_GED.unsqueeze(0)
        E = keys_GED.shape[1]
        unit_GED = F.normalize(keys_GED, dim=-1)
        cos_GEE = unit_GED @ unit_GED.transpose(1, 2)
        off_EE = cos_GEE[:, ~torch.eye(E, dtype=torch.bool, device=cos_GEE.device)]
        out = {"key_norm_mean": float(keys_GED.norm(dim=-1).mean())}
        if E > 1:
            out.update(key_cos_mean=float(off_EE.mean()), key_cos_max=float(off_EE.max()))
        return out
