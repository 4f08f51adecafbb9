"""Expert specialisation: which tokens each SoME expert receives on held-out text.

A forward hook on every SoME layer re-routes the layer's input with
``SoMELayer.route`` (the same scores, temperature and top-k the forward used)
and counts (expert, current token) pairs. Raw counts favour frequent tokens
(" the", "."), so each expert's tokens are also ranked by *lift*: the token's
share of the expert's slots over its share of all slots (1 = no preference).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import torch

from ..data import BPETokenizer, TokenStream, eval_batches
from ..models.ffn import SelfOrganizing


@dataclass
class ExpertTokens:
    expert: int
    share: float  # of this layer's routed slots on the sample
    top_by_count: list[tuple[str, int]]
    top_by_lift: list[tuple[str, float, int]]  # (token, lift, count)


@dataclass
class LayerRouting:
    layer: int
    counts_ET: np.ndarray  # experts x vocab slot counts

    @property
    def expert_slots(self) -> np.ndarray:
        return self.counts_ET.sum(axis=1)


@torch.no_grad()
def route_counts(model, stream: TokenStream, seq_len: int, batch_size: int = 8, max_batches: int = 20,
                 pad_id: int = 0) -> dict[int, LayerRouting]:
    """(expert, token) slot counts of every SoME layer over the first ``max_batches`` windows of ``stream``."""
    layers = {i: f for i, f in enumerate(model.ffns()) if isinstance(f, SelfOrganizing)}  # keyed by block
    V = model.cfg.vocab_size
    counts = {i: np.zeros((layer.cfg.num_experts, V), dtype=np.int64) for i, layer in layers.items()}
    current: dict[str, torch.Tensor] = {}

    def hook(counts_EV: np.ndarray):
        def record(module, inputs, output):
            idx_BTK, _ = module.route(inputs[0])
            tokens_BTK = current["x"].unsqueeze(-1).expand_as(idx_BTK)
            keep = current["mask"].unsqueeze(-1).expand_as(idx_BTK)
            flat = idx_BTK[keep].cpu().numpy() * V + tokens_BTK[keep].cpu().numpy()
            counts_EV[...] += np.bincount(flat, minlength=counts_EV.size).reshape(-1, V)
        return record

    handles = [layer.register_forward_hook(hook(counts[i])) for i, layer in layers.items()]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for x_BT, y_BT in eval_batches(stream, seq_len, batch_size, max_batches, pad_id=pad_id):
            current["x"], current["mask"] = x_BT.to(device), (x_BT != pad_id).to(device)
            model(x_BT.to(device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {i: LayerRouting(i, c) for i, c in counts.items()}


def token_text(tokenizer: BPETokenizer, token: int) -> str:
    """A token as a quoted, escaped string (leading spaces and newlines stay visible)."""
    return json.dumps(tokenizer.decode([token]), ensure_ascii=False)


def expert_tokens(routing: LayerRouting, tokenizer: BPETokenizer, top_experts: int = 8, top_tokens: int = 8,
                  min_count: int = 5) -> list[ExpertTokens]:
    """The busiest experts of a layer with their most frequent and most over-represented tokens."""
    counts = routing.counts_ET
    slots = counts.sum(axis=1)
    total = max(int(slots.sum()), 1)
    token_share = counts.sum(axis=0) / total
    out = []
    for e in np.argsort(-slots, kind="stable")[:top_experts]:
        if slots[e] == 0:
            break
        row = counts[e]
        by_count = [(token_text(tokenizer, t), int(row[t])) for t in np.argsort(-row, kind="stable")[:top_tokens]
                    if row[t] > 0]
        lift = np.where(row >= min_count, (row / slots[e]) / np.maximum(token_share, 1e-12), 0.0)
        by_lift = [(token_text(tokenizer, t), float(lift[t]), int(row[t]))
                   for t in np.argsort(-lift, kind="stable")[:top_tokens] if lift[t] > 0]
        out.append(ExpertTokens(int(e), float(slots[e] / total), by_count, by_lift))
    return out
