"""The language-model metrics: loss per token, perplexity and bits per byte.

Bits per byte divides the total NLL (in bits) by the UTF-8 bytes the targets
stand for: each token contributes the bytes of its text and each EOS one byte
(a story end). Over a whole stream that is exactly "bytes of the evaluated
stories + one per story", so runs with different tokenizers compare honestly.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .models import IGNORE_INDEX
from .train.dist import all_reduce_sum_


@dataclass
class EvalResult:
    loss: float  # mean NLL in nats per counted target token
    ppl: float
    bpb: float
    tokens: int
    bytes: int
    readouts: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict:
        out = {"loss": self.loss, "ppl": self.ppl, "bpb": self.bpb, "tokens": self.tokens, "bytes": self.bytes}
        out.update(self.readouts)
        return out


def summarize(nll_nats: float, tokens: int, n_bytes: int) -> tuple[float, float, float]:
    """(loss, ppl, bpb) from summed NLL in nats, counted tokens and bytes."""
    loss = nll_nats / max(tokens, 1)
    bpb = nll_nats / math.log(2) / max(n_bytes, 1)
    return loss, math.exp(min(loss, 50.0)), bpb


def _underlying(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches, token_bytes: np.ndarray, device: torch.device,
             autocast=contextlib.nullcontext, adapt: bool = False, rank: int = 0, world_size: int = 1,
             on_batch=None) -> EvalResult:
    """Evaluate ``batches`` (iterable of (x_BT, y_BT)); windows are sharded across ranks and summed.

    With ``adapt`` the SoME layers keep self-organizing during evaluation
    (ablation C): their statistics are applied after every batch. This is the one
    place that turns their ``adapt_at_inference`` flag on, for the duration of the call.
    """
    lm = _underlying(model)
    was_training = lm.training
    adapting = lm.self_organizing_layers() if adapt else []
    flags = [layer.cfg.adapt_at_inference for layer in adapting]
    for layer in adapting:
        layer.cfg.adapt_at_inference = True  # their eval forwards now gather statistics
    lm.eval()
    lm.reset_readouts()
    bytes_lookup = torch.as_tensor(token_bytes, dtype=torch.int64)
    sums = torch.zeros(3, dtype=torch.float64)  # nll, tokens, bytes
    for i, (x_BT, y_BT) in enumerate(batches):
        if i % world_size != rank:
            continue
        x_BT, y_BT = x_BT.to(device), y_BT.to(device)
        with autocast():
            logits = lm(x_BT).logits
        nll = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y_BT.reshape(-1),
                              ignore_index=IGNORE_INDEX, reduction="sum")
        counted = y_BT[y_BT != IGNORE_INDEX].cpu()
        sums += torch.tensor([nll.item(), counted.numel(), bytes_lookup[counted].sum().item()], dtype=torch.float64)
        for layer in adapting:
            layer.self_organize_at_inference()
        if on_batch is not None:
            on_batch(i, nll.item(), counted.numel())
    all_reduce_sum_([sums])
    readouts = lm.readouts()
    for layer, flag in zip(adapting, flags):
        layer.cfg.adapt_at_inference = flag
    lm.train(was_training)
    loss, ppl, bpb = summarize(sums[0].item(), int(sums[1].item()), int(sums[2].item()))
    return EvalResult(loss, ppl, bpb, int(sums[1].item()), int(sums[2].item()), readouts)
