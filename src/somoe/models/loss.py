"""Token cross-entropy for language-model training, in fp32 whatever the logits' dtype.

On the CPU it runs over blocks of rows (:class:`_BlockedCrossEntropy`) instead of
``F.cross_entropy(logits.float())``. That call makes an fp32 copy of all the logits, saves
log-softmax's fp32 output, then in backward zero-fills an fp32 gradient the size of the
logits before scattering into it. For cpu_gpt2 (8192 tokens, vocabulary 2048) that is five
passes over 64 MB, with page faults on the fresh buffers. By blocks of rows, each fp32
temporary stays in cache: forward reads the logits once (log-sum-exp and the target's
logit), backward reads them once and writes the gradient once. Measured on the dev box:
docs/benchmarks.md. Other devices keep PyTorch's fused kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BLOCK_ROWS = 1024  # 1024 x 2048 fp32 = 8 MB of temporaries per block


def token_cross_entropy(logits_NV: torch.Tensor, targets_N: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Mean cross-entropy in fp32 over the targets that are not ``ignore_index`` (0 when there are none)."""
    if logits_NV.device.type != "cpu":
        return F.cross_entropy(logits_NV.float(), targets_N, ignore_index=ignore_index)
    return _BlockedCrossEntropy.apply(logits_NV, targets_N, ignore_index)


def _blocks(n: int):
    for start in range(0, n, BLOCK_ROWS):
        yield start, min(start + BLOCK_ROWS, n)


class _BlockedCrossEntropy(torch.autograd.Function):
    """``mean_i (logsumexp(z_i) - z_i[t_i])`` over valid rows; gradient ``(softmax(z_i) - onehot(t_i)) / n``."""

    @staticmethod
    def forward(ctx, logits_NV, targets_N, ignore_index):
        with torch.autocast("cpu", enabled=False):
            valid_N = targets_N != ignore_index
            safe_N = torch.where(valid_N, targets_N, 0)  # any column: invalid rows are masked out
            lse_N = logits_NV.new_empty(logits_NV.shape[0], dtype=torch.float32)
            target_logit_N = torch.empty_like(lse_N)
            for s, e in _blocks(logits_NV.shape[0]):
                z = logits_NV[s:e].float()
                torch.logsumexp(z, 1, out=lse_N[s:e])
                target_logit_N[s:e] = z.gather(1, safe_N[s:e, None]).squeeze(1)
            count = valid_N.sum().clamp_min(1)
            loss = torch.where(valid_N, lse_N - target_logit_N, 0.0).sum() / count
        ctx.save_for_backward(logits_NV, safe_N, valid_N, lse_N, count)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        logits_NV, safe_N, valid_N, lse_N, count = ctx.saved_tensors
        scale_N = valid_N.float() * (grad_loss.float() / count)
        grad_NV = torch.empty_like(logits_NV)
        for s, e in _blocks(logits_NV.shape[0]):
            p = (logits_NV[s:e].float() - lse_N[s:e, None]).exp_()  # softmax; fp32 logits stay untouched
            p.scatter_add_(1, safe_N[s:e, None], p.new_full((e - s, 1), -1.0))
            grad_NV[s:e] = p.mul_(scale_N[s:e, None])
        return grad_NV, None, None
