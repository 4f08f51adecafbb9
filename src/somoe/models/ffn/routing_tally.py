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
    def attach(cls, layer: nn.Module, num_experts: int) -> "RoutingTally":
        """A tally held by ``layer`` as ``layer._tally``, unregistered (see the class docstring)."""
        tally = cls(num_experts)
        object.__setattr__(layer, "_tally", tally)
        return tally

    def __init__(self, num_experts: int):
        super().__init__()
        self.num_experts = num_experts
        self.register_buffer("counts", torch.zeros(num_experts, dtype=torch.int64), persistent=False)
        # one-element sums, not 0-d: torch.compile reads a 0-d CPU tensor of this unregistered module as a
        # Python number (a symbolic float), and inductor then restarts the whole trace to specialise it
        self.register_buffer("gate_entropy", torch.zeros(1, dtype=torch.float64), persistent=False)
        self.register_buffer("dropped_slots", torch.zeros(1, dtype=torch.int64), persistent=False)
        self.register_buffer("token_count", torch.zeros(1, dtype=torch.int64), persistent=False)

    def reset(self) -> None:
        for buf in (self.counts, self.gate_entropy, self.dropped_slots, self.token_count):
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
        return {"usage_gini": gini(counts_E), "usage_entropy_bits": bits,
                "usage_entropy_norm": bits / math.log2(E) if E > 1 else 1.0,
                "gate_entropy_nats": float(self.gate_entropy) / tokens}
