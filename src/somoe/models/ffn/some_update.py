"""The SoME layer's self-organizing key update (spec section 3), once per optimizer step.

One implementation serves the eager trainer and the compiled training step: every decision is
taken on the device (``torch.where`` over the old and new state), never by reading a statistic on
the host, so ``torch.compile(fullgraph=True)`` traces it and a CUDA graph can replay it. The eager
entry point :meth:`KeyUpdates.self_organize` passes the rates as Python floats; the compiled step
(``somoe.train.step``) passes them as a device tensor filled outside the graph, so that a new rate is
new data, not a new graph.

``som_updates`` counts scheduled updates (``step % update_every == 0``), whether or not the step's
statistics held a routed slot, on the device and on the host alike (``_updates_on_host``, which
seeds the query samples' uniforms): a resumed run reads it back and draws what an uninterrupted one
draws. An update whose step saw no routed slot changes no key (the rules would divide by zero).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import some_rules as rules
from .some_product import load_balance_step

LOG_TAU_LIMIT = 3.0  # the entropy-band controller keeps tau's multiplier within e^-3..e^3
SAMPLE_SEED_OFFSET = 2_000_003


@dataclass
class Rates:
    """Rule rates at one optimizer step: Python floats (eager) or 0-d device tensors (compiled step)."""

    alpha: float | torch.Tensor
    gamma: float | torch.Tensor
    beta: float | torch.Tensor
    delta: float | torch.Tensor


def from_host(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A tensor made on the host, on ``device`` without a host sync: a plain copy to CUDA waits for
    the stream, a non-blocking one from pinned memory is queued (PyTorch's pinned-memory allocator
    keeps the buffer until the copy has run)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _commit(live: torch.Tensor, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """``buf <- new`` where ``live`` (a 0-d bool tensor), else unchanged; in place, no host read."""
    for buf, new in pairs:
        buf.copy_(torch.where(live, new.to(buf.dtype), buf))


class KeyUpdates:
    """Mixed into :class:`~somoe.models.ffn.some.SoMELayer`: the rules applied to its buffers."""

    # --- rates ------------------------------------------------------------------------------
    def rates(self, step: int, total_steps: int) -> Rates:
        """Rule rates at an optimizer step: schedules times the ``som_warmup_steps`` ramp."""
        c = self.cfg
        frac = min(1.0, step / total_steps) if total_steps > 0 else 0.0
        ramp = rules.som_ramp(step, c.som_warmup_steps)
        return Rates(ramp * rules.alpha_at(c, frac), ramp * c.gamma, ramp * rules.beta_at(c, frac), ramp * c.delta)

    # --- entry points ---------------------------------------------------------------------
    @torch.no_grad()
    def self_organize(self, step: int, total_steps: int) -> None:
        """Apply this step's (all-reduced) statistics to the keys, then clear them (eager trainer)."""
        if step % self.cfg.update_every == 0:
            self._apply_rules(self.rates(step, total_steps),
                              rules.top_k_at(self.cfg, step, total_steps) >= self.cfg.top_k)
            self.som_updates += 1
            self.count_update_on_host()
        self._clear_statistics()

    @torch.no_grad()
    def self_organize_traced(self, rates_4: torch.Tensor, scheduled: torch.Tensor, ok: torch.Tensor) -> None:
        """The compiled step's update: ``rates_4`` (alpha, gamma, beta, delta), ``scheduled`` and ``ok``
        (a finite step) as device tensors; the host then calls :meth:`count_update_on_host` when scheduled.
        A skipped step (``ok`` false) leaves the rule state as it was, as the eager trainer's restore does."""
        self._apply_rules(Rates(*rates_4.unbind()), self.top_k_live >= self.cfg.top_k, scheduled & ok)
        self.som_updates += scheduled.to(self.som_updates.dtype)
        self._clear_statistics()

    @torch.no_grad()
    def self_organize_at_inference(self) -> None:
        """Ablation C: apply an adapting eval batch's statistics with the end-of-training rates."""
        total = max(self._total_steps, 1)
        self._apply_rules(self.rates(total, total), True)
        self.som_updates += 1
        self.count_update_on_host()
        self._clear_statistics()

    def count_update_on_host(self) -> None:
        """The host's mirror of ``som_updates`` and the next update's query-sample uniforms."""
        self._updates_on_host += 1
        self._refresh_draws()

    @torch.no_grad()
    def _refresh_draws(self) -> None:
        """The uniforms of this key update's query samples (``decay_target=sample``), from a host
        generator seeded by (seed, layer, update count), copied to the device without a host sync: a
        resumed run draws what an uninterrupted one draws, and the forward reads them by the device
        draw counter, with no host RNG or host counter in the step."""
        if not hasattr(self, "sample_u") or self.sample_u.is_meta:
            return
        seed = self.cfg.expert_seed + self.layer_idx + SAMPLE_SEED_OFFSET + 7919 * self._updates_on_host
        gen = torch.Generator(device="cpu").manual_seed(seed)
        u = torch.rand(self.sample_u.shape, generator=gen, device="cpu", dtype=torch.float64)
        self.sample_u.copy_(from_host(u, self.sample_u.device))

    # --- the rules ---------------------------------------------------------------------------
    def _apply_rules(self, r: Rates, k_full: bool | torch.Tensor, live: torch.Tensor | None = None) -> None:
        """The rules in the spec's order; ``k_full``: top-k has reached its final k (the entropy band
        waits for it); ``live`` (device bool, None = true): whether the update happens at all."""
        c = self.cfg
        slots = self.stat_count.sum()
        live = slots > 0 if live is None else live & (slots > 0)
        # keys (E x D) or sub-key codebooks (G x n x d_k): every rule acts within a codebook (some_rules)
        keys_ED = self.key_store.float()
        delta_ED = torch.zeros_like(keys_ED)
        if c.attraction:
            delta_ED += rules.attraction_delta(keys_ED, self.stat_q_sum, self.stat_gate, r.alpha)
        if c.peer and "stat_peer_sum" in self._statistics:
            delta_ED += rules.peer_delta(keys_ED, self.stat_peer_sum, self.stat_peer_mass, r.gamma)
        if c.repulsion:
            delta_ED += rules.repulsion_delta(keys_ED, r.beta)
        usage_E = rules.updated_usage(self.usage_ema, self.stat_count, c.ema_decay if c.usage_ema else 0.0)
        # expected slots of a whole step (per codebook): the statistics may have seen a fraction of the tokens
        slots_per_book = self.stat_count.sum(-1, keepdim=True)
        dormant_E = rules.dormant_mask(usage_E, slots_per_book / c.update_token_fraction, c.theta,
                                       c.theta_percentile)
        means = self._query_means()
        if c.decay:
            # the mean query, split into each codebook's half: (1, D) or (G, 1, d_k)
            mean_target = means[0].view(*keys_ED.shape[:-2], 1, keys_ED.shape[-1])
            target = (self.stat_q_samples / self.stat_sample_draws.clamp_min(1.0) if c.decay_target == "sample"
                      else mean_target)
            delta_ED += rules.decay_delta(keys_ED, dormant_E, target, r.delta)
        new_ED = keys_ED + rules.clip_rows(delta_ED, c.delta_clip)
        if c.key_norm:
            new_ED = F.normalize(new_ED, dim=-1)
        pairs = [(self.usage_ema, usage_E), (self.dormant_streak, torch.where(dormant_E, self.dormant_streak + 1, 0)),
                 (self.key_drift, (new_ED - keys_ED).norm(dim=-1).mean()), (self.key_store, new_ED)]
        pairs += zip(self._query_mean_buffers(), means)
        if c.key_ema > 0:
            route_ED = c.key_ema * self.key_route + (1.0 - c.key_ema) * new_ED
            pairs.append((self.key_route, F.normalize(route_ED, dim=-1) if c.key_norm else route_ED))
        if hasattr(self, "selection_bias"):  # loss-free balancing of the product router's sub-keys
            pairs.append((self.selection_bias, load_balance_step(self.selection_bias, self.stat_count,
                                                                 c.selection_bias_rate)))
        self._entropy_band(live & k_full)  # before the commit: it reads the statistics, not the state above
        _commit(live, pairs)

    def _query_mean_buffers(self) -> list[torch.Tensor]:
        return [self.query_mean_ema] + ([self.query_center] if self.cfg.center_queries else [])

    def _query_means(self) -> list[torch.Tensor]:
        """The updated EMAs of the (centred-rule) query mean and of the raw-query centre; the first update
        copies the step's mean (no EMA bias toward the zero they start from)."""
        tokens = self.stat_tokens.clamp_min(1.0)
        first = self.som_updates == 0
        totals = [(self.stat_q_total, self.cfg.ema_decay)]
        if self.cfg.center_queries:
            totals.append((self.stat_q_raw_total, self.cfg.center_decay))
        return [torch.where(first, total / tokens, ema * decay + (1.0 - decay) * total / tokens)
                for ema, (total, decay) in zip(self._query_mean_buffers(), totals)]

    def _entropy_band(self, on: torch.Tensor) -> None:
        """Nudge log_tau so the mean gate entropy stays in the band (off while top-k warms up)."""
        c = self.cfg
        if not c.entropy_band_on:
            return
        low, high = c.entropy_band
        tokens = self.stat_tokens
        mean_entropy = self.stat_gate_entropy / tokens.clamp_min(1e-30)
        rate = torch.where(mean_entropy < low, c.entropy_band_rate,
                           torch.where(mean_entropy > high, -c.entropy_band_rate, 0.0))
        nudged = (self.log_tau + rate).clamp(-LOG_TAU_LIMIT, LOG_TAU_LIMIT)  # higher tau -> flatter gates
        _commit(on & (tokens > 0), [(self.log_tau, nudged)])  # no_grad: a trained log_tau too
