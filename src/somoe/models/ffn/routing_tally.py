"""Usage readouts shared by the routed FFNs (SoME, MoE): what every eval logs per layer."""

from __future__ import annotations

import math

import torch

from ...analysis.usage import entropy_bits, gini
from .some_rules import gate_entropy_sum


class RoutingTally:
    """Routed slots per expert, gate entropy and dropped slots since the last ``reset``.

    Sums stay on the routing device (no host sync per forward): int64 counts, float64
    entropy (float32 on MPS, which has no float64).
    """

    def __init__(self, num_experts: int):
        self.num_experts = num_experts
        self._acc: dict[str, torch.Tensor] | None = None

    def reset(self) -> None:
        self._acc = None

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
        if self._acc is not None and self._acc["counts"].device != counts_E.device:
            # the layer moved (``model.to(...)``) since the last reset: the tallies follow it
            self._acc = {k: v.to(counts_E.device) for k, v in self._acc.items()}
        if self._acc is None:
            dev = counts_E.device
            fdt = torch.float32 if dev.type == "mps" else torch.float64
            self._acc = {"counts": torch.zeros(self.num_experts, dtype=torch.int64, device=dev),
                         "gate_entropy": torch.zeros((), dtype=fdt, device=dev),
                         "dropped": torch.zeros((), dtype=torch.int64, device=dev),
                         "tokens": torch.zeros((), dtype=torch.int64, device=dev)}
        acc = self._acc
        acc["counts"] += counts_E.long() if counts_E.is_floating_point() else counts_E
        acc["gate_entropy"] += entropy_sum  # in place: promoted to the accumulator's dtype
        if dropped is not None:
            acc["dropped"] += dropped
        acc["tokens"] += tokens.long() if isinstance(tokens, torch.Tensor) else tokens

    @property
    def tokens(self) -> int:
        return 0 if self._acc is None else int(self._acc["tokens"])

    @property
    def dropped(self) -> int:
        return 0 if self._acc is None else int(self._acc["dropped"])

    def summary(self) -> dict[str, float]:
        """Usage Gini, usage entropy (bits and normalised), mean gate entropy (nats); {} before any token."""
        if self.tokens == 0:
            return {}
        counts_E, E = self._acc["counts"].cpu(), self.num_experts
        bits = entropy_bits(counts_E) + 0.0  # + 0.0: no "-0.0" when one expert takes everything
        return {"usage_gini": gini(counts_E), "usage_entropy_bits": bits,
                "usage_entropy_norm": bits / math.log2(E) if E > 1 else 1.0,
                "gate_entropy_nats": float(self._acc["gate_entropy"]) / self.tokens}
