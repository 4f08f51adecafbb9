"""Training and evaluation batches cut from a :class:`~somoe.data.cache.TokenStream`.

Training batches are a pure function of ``(seed, step, global_batch)``: every
row of the global batch of optimizer step ``step`` is fixed before anyone asks
for it, and :meth:`TrainBatches.batch` just returns a slice of those rows. So
resuming at step s, splitting the batch across DDP ranks, or across gradient
accumulation micro-batches all train on exactly the same samples. No global
RNG state is touched.

Windows are cut here, at batch time, which is why the token cache does not
depend on ``seq_len``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Literal

import numpy as np
import torch

from ..config import ConfigError
from ..models import IGNORE_INDEX
from .cache import TokenStream
from .tokenizer import PAD_ID


class TrainBatches:
    """Random training rows of ``seq_len`` inputs and ``seq_len`` next-token targets.

    ``packed``: windows of ``seq_len + 1`` consecutive tokens at uniform random
    starts of the EOS-joined stream (stories run into each other across EOS).

    ``padded``: one story per row, ``[EOS] story [EOS]`` cut to ``seq_len + 1``
    and right-padded with PAD; targets at PAD are ``IGNORE_INDEX``. Stories are
    visited in a fresh permutation each epoch, seeded by ``(seed, epoch)``.
    """

    def __init__(self, stream: TokenStream, mode: Literal["packed", "padded"], seq_len: int, seed: int,
                 pad_id: int, eos_id: int):
        if mode not in ("packed", "padded"):
            raise ConfigError(f"unknown data.mode={mode!r}; use packed or padded")
        if seq_len < 1:
            raise ConfigError(f"data.seq_len={seq_len} must be positive")
        if mode == "packed" and len(stream) < seq_len + 1:
            raise ConfigError(f"the training split has {len(stream)} tokens, fewer than data.seq_len+1="
                              f"{seq_len + 1}; lower data.seq_len or use more training stories")
        if mode == "padded" and stream.n_stories == 0:
            raise ConfigError("the training split has no stories; check the data source")
        self.stream, self.mode, self.seq_len, self.seed = stream, mode, seq_len, seed
        self.pad_id, self.eos_id = pad_id, eos_id
        self._lengths = stream.story_lengths if mode == "padded" else None
        self._perms: dict[int, np.ndarray] = {}  # epoch -> permutation (micro-batches reuse it)

    def steps_per_epoch(self, global_batch: int) -> int:
        """Optimizer steps for one pass: tokens / (batch x seq_len) packed, stories / batch padded."""
        if self.mode == "packed":
            return max(1, len(self.stream) // (global_batch * self.seq_len))
        return math.ceil(self.stream.n_stories / global_batch)

    def batch(self, step: int, global_batch: int, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``[start, start + count)`` of step ``step``'s global batch: ``(x_BT, y_BT)``, int64."""
        if not 0 <= start <= start + count <= global_batch:
            raise ValueError(f"rows [{start}, {start + count}) are outside a global batch of {global_batch}")
        if self.mode == "packed":
            rows = self._packed(step, global_batch, start, count)
            x, y = rows[:, :-1], rows[:, 1:]
        else:
            x, y = self._padded(step, global_batch, start, count)
        return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y))

    def _packed(self, step: int, global_batch: int, start: int, count: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, step])
        # draw the starts of the WHOLE global batch so any slice of it is the same
        starts = rng.integers(0, len(self.stream) - self.seq_len, size=global_batch)[start:start + count]
        index = starts[:, None] + np.arange(self.seq_len + 1)
        return np.asarray(self.stream.tokens[index], dtype=np.int64)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) >= 2:  # a global batch usually spans at most two epochs
                self._perms.pop(next(iter(self._perms)))
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.stream.n_stories)
        return self._perms[epoch]

    def _padded(self, step: int, global_batch: int, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        n, width = self.stream.n_stories, self.seq_len + 1
        rows = np.full((count, width), self.pad_id, dtype=np.int64)
        used = np.empty(count, dtype=np.int64)  # real (non-PAD) tokens per row
        for row in range(count):
            # global sample index: the batch may straddle two epochs, each row uses its own epoch's order
            g = step * global_batch + start + row
            story = int(self._permutation(g // n)[g % n])
            lo = int(self.stream.offsets[story])
            # [EOS] story [EOS] is a contiguous slice of the stream: the EOS before and after the story
            seq = np.asarray(self.stream.tokens[lo - 1:min(lo + int(self._lengths[story]) + 1, lo - 1 + width)],
                             dtype=np.int64)
            rows[row, :len(seq)] = seq
            used[row] = len(seq)
        x, y = rows[:, :-1], rows[:, 1:].copy()
        # a target is PAD exactly at positions >= used - 1: never scored
        y[np.arange(self.seq_len)[None, :] >= used[:, None] - 1] = IGNORE_INDEX
        return x, y


def eval_windows(n_tokens: int, seq_len: int) -> int:
    """Number of eval windows that cover the ``n_tokens - 1`` targets of a stream."""
    return math.ceil(max(n_tokens - 1, 0) / seq_len)


def count_eval_targets(stream: TokenStream, seq_len: int, batch_size: int = 0, max_batches: int = 0) -> int:
    """Targets that :func:`eval_batches` scores: every token after the first, or fewer when
    ``max_batches`` (with ``batch_size``) cuts the evaluation short."""
    total = max(len(stream) - 1, 0)
    if max_batches > 0 and batch_size > 0:
        return min(total, max_batches * batch_size * seq_len)
    return total


def eval_batches(stream: TokenStream, seq_len: int, batch_size: int, max_batches: int = 0, *,
                 pad_id: int = PAD_ID) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Contiguous, non-overlapping windows scoring every token after the first exactly once.

    Window i has inputs ``tokens[i*L : i*L+L]`` and targets ``tokens[i*L+1 : i*L+L+1]``.
    The last window is shorter: its inputs are padded with ``pad_id`` and its
    targets with ``IGNORE_INDEX``. Windows are grouped ``batch_size`` at a time
    (the last batch may have fewer rows); ``max_batches > 0`` stops early.
    """
    if seq_len < 1 or batch_size < 1:
        raise ValueError(f"seq_len={seq_len} and batch_size={batch_size} must be positive")
    n_windows = eval_windows(len(stream), seq_len)
    n_batches = math.ceil(n_windows / batch_size)
    if max_batches > 0:
        n_batches = min(n_batches, max_batches)
    n_targets = len(stream) - 1
    for b in range(n_batches):
        first, last = b * batch_size, min((b + 1) * batch_size, n_windows)
        lo = first * seq_len
        hi = min(last * seq_len, n_targets)  # targets lo+1 .. hi (inclusive) are scored in this batch
        # one contiguous read, then a reshape: input i is chunk[i], its target chunk[i + 1]
        chunk = np.asarray(stream.tokens[lo:hi + 1], dtype=np.int64)
        rows = last - first
        x = np.full(rows * seq_len, pad_id, dtype=np.int64)
        y = np.full(rows * seq_len, IGNORE_INDEX, dtype=np.int64)
        x[:hi - lo] = chunk[:-1]
        y[:hi - lo] = chunk[1:]
        yield torch.from_numpy(x.reshape(rows, seq_len)), torch.from_numpy(y.reshape(rows, seq_len))
