"""Usage readouts shared by the routed FFNs (SoME, MoE): what every eval logs per layer."""

from __future__ import annotations

import math

import torch
from torch import nn

from .usage import entropy_bits, gini
from .some_rules import gate_entropy_sum


class RoutingTally(nn.Module):
    """Routed slots per expert, gate entropy and dropped slots since the last ``reset``.

    Sums are buffers on the routing device, allocated once (no host sync per forward, and a
    forward that adds to them is the same graph for ``torch.compile`` at every step): int64
    counts, float64 entropy. Not a registered submodule of its layer (:meth:`attach`): the tallies
    are per rank and per eval, not model state, so they stay out of ``state_dict``,
    ``named_buffers`` and the cross-rank checks of the model's buffers; the layer's ``_apply``
    moves them along with it.
    """

    @classmethod
    def attach(cls, layer: nn.Module, num_experts: int, codebooks: tuple[int, int] | None = None) -> "RoutingTally":
        """A tally held by ``layer`` as ``layer._tally``, unregistered (see the class docstring)."""
        tally = cls(num_experts, codebooks)
        object.__setattr__(layer, "_tally", tally)
        return tally

    def __init__(self, num_experts: int, codebooks: tuple[int, int] | None = None):
        """``codebooks`` (G, n): a product-key layer's sub-keys, tallied per codebook too."""
        super().__init__()
        self.num_experts, self.codebooks = num_experts, codebooks
        self.register_buffer("counts", torch.zeros(num_experts, dtype=torch.int64), persistent=False)
        if codebooks is not None:
            self.register_buffer("subkey_counts", torch.zeros(codebooks, dtype=torch.int64), persistent=False)
        # one-element sums, not 0-d: torch.compile reads a 0-d CPU tensor of this unregistered module as a
        # Python number (a symbolic float), and inductor then restarts the whole trace to specialise it
        self.register_buffer("gate_entropy", torch.zeros(1, dtype=torch.float64), persistent=False)
        self.register_buffer("dropped_slots", torch.zeros(1, dtype=torch.int64), persistent=False)
        self.register_buffer("token_count", torch.zeros(1, dtype=torch.int64), persistent=False)

    def reset(self) -> None:
        for buf in self.buffers():
            buf.zero_()

    @torch.no_grad()
    def add(self, counts_E: torch.Tensor, gates_TK: torch.Tensor, dropped: torch.Tensor | None = None,
            weight_T: torch.Tensor | None = None) -> None:
        """Tally a forward: ``counts_E`` of its counted slots, ``weight_T`` 1 for counted tokens, 0 for
        padding (None: all counted)."""
        entropy = gate_entropy_sum(gates_TK.float(), weight_T)
        self.add_sums(counts_E, entropy, gates_TK.shape[0] if weight_T is None else weight_T.sum(), dropped)

    @torch.no_grad()
    def add_sums(self, counts_E: torch.Tensor, entropy_sum: torch.Tensor, tokens: int | torch.Tensor,
                 dropped: torch.Tensor | None = None) -> None:
        """Tally precomputed sums (the SoME layer computes the gate entropy once for its statistics too)."""
        self.counts += counts_E.long() if counts_E.is_floating_point() else counts_E
        self.gate_entropy += entropy_sum  # in place: promoted to the accumulator's dtype
        if dropped is not None:
            self.dropped_slots += dropped
        self.token_count += tokens.long() if isinstance(tokens, torch.Tensor) else tokens

    @torch.no_grad()
    def add_slots(self, expert_S: torch.Tensor, subkey_rows_S: torch.Tensor, weight_T: torch.Tensor | None,
                  entropy_sum: torch.Tensor, tokens: int | torch.Tensor) -> None:
        """Tally a product-key forward slot by slot (``O(slots)``, never ``O(num_experts)``): ``expert_S``
        (T, ...) expert ids, ``subkey_rows_S`` (T, ...) flat rows in the (G, n) codebooks."""
        def weights(index: torch.Tensor) -> torch.Tensor:
            if weight_T is None:
                return torch.ones_like(index).reshape(-1)
            return weight_T.long().view(-1, *([1] * (index.dim() - 1))).expand_as(index).reshape(-1)

        self.counts.index_add_(0, expert_S.reshape(-1), weights(expert_S))
        self.subkey_counts.view(-1).index_add_(0, subkey_rows_S.reshape(-1), weights(subkey_rows_S))
        self.gate_entropy += entropy_sum
        self.token_count += tokens.long() if isinstance(tokens, torch.Tensor) else tokens

    @property
    def tokens(self) -> int:
        return int(self.token_count)

    @property
    def dropped(self) -> int:
        return int(self.dropped_slots)

    def summary(self) -> dict[str, float]:
        """Usage Gini, usage entropy (bits and normalised), mean gate entropy (nats); {} before any token."""
        tokens = self.tokens
        if tokens == 0:
            return {}
        counts_E, E = self.counts.cpu(), self.num_experts
        bits = entropy_bits(counts_E) + 0.0  # + 0.0: no "-0.0" when one expert takes everything
        out = {"usage_gini": gini(counts_E), "usage_entropy_bits": bits,
               "usage_entropy_norm": bits / math.log2(E) if E > 1 else 1.0,
               "gate_entropy_nats": float(self.gate_entropy) / tokens}
        out.update(coverage_readouts(counts_E))
        if self.codebooks is not None:
            out.update(codebook_readouts(self.subkey_counts.cpu()))
        return out


def coverage_readouts(counts_E: torch.Tensor) -> dict[str, float]:
    """Large-pool readouts (PKM's and PEER's): the share of experts routed at least once and the slots it
    was measured over, KL(usage || uniform) in nats, and MaxVio (max load / mean load - 1)."""
    counts = counts_E.double()
    slots = float(counts.sum())
    if slots <= 0:
        return {}
    E = counts.numel()
    p = counts / slots
    nz = p[p > 0]
    kl = math.log(E) + float((nz * nz.log()).sum())
    return {"coverage": float((counts > 0).double().mean()), "coverage_slots": slots,
            "usage_kl_uniform": max(kl, 0.0), "max_violation": float(counts.max()) / (slots / E) - 1.0}


def codebook_readouts(counts_Gn: torch.Tensor) -> dict[str, float]:
    """Per-codebook usage of sub-keys: the largest and mean Gini, the mean normalised entropy."""
    ginis = [gini(row) for row in counts_Gn]
    n = counts_Gn.shape[-1]
    entropies = [entropy_bits(row) / math.log2(n) if n > 1 else 1.0 for row in counts_Gn]
    return {"codebook_gini_max": max(ginis), "codebook_gini_mean": sum(ginis) / len(ginis),
            "codebook_entropy_norm_mean": sum(entropies) / len(entropies)}
