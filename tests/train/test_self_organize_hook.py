"""The trainer's self-organization hook, checked with a counting FFN.

The FFN counts the tokens of training forwards (never eval, never an
activation-checkpoint recompute); the trainer must call ``self_organize`` once
per optimizer step, after every micro-batch, with the step's whole count.
"""

import torch

from helpers import tiny_config
from somoe.models.ffn import in_recompute, register_ffn
from somoe.models.ffn.dense import DenseFFN
from somoe.train.trainer import Trainer


@register_ffn("counting_dense")
class CountingDense(DenseFFN):
    def __init__(self, cfg, layer_idx=0):
        super().__init__(cfg, layer_idx)
        self.register_buffer("tokens_seen", torch.zeros(1))
        self.applied: list[tuple[int, float]] = []

    def forward(self, x_BTD, valid_BT=None):
        if self.training and not in_recompute():
            self.tokens_seen += x_BTD.shape[0] * x_BTD.shape[1]
        return super().forward(x_BTD, valid_BT)

    def som_statistics(self):
        return [self.tokens_seen]

    def self_organize(self, step, total_steps):
        self.applied.append((step, self.tokens_seen.item()))
        self.tokens_seen.zero_()


def run_steps(tmp_path, data_cache, *overrides):
    cfg = tiny_config(data_cache, "model.ffn=counting_dense", "train.max_steps=3", *overrides)
    trainer = Trainer(cfg, tmp_path, progress=False, log=lambda m: None)
    for _ in range(3):
        trainer.train_step()
    trainer.run_eval()
    return trainer, cfg


def test_called_once_per_step_with_all_micro_batches(tmp_path, data_cache):
    trainer, cfg = run_steps(tmp_path, data_cache, "train.grad_accum=4")
    per_step = cfg.train.batch_size * cfg.data.seq_len
    for ffn in trainer.model.ffns():
        assert ffn.applied == [(0, per_step), (1, per_step), (2, per_step)]
        assert ffn.tokens_seen.item() == 0  # the eval forwards counted nothing


def test_activation_checkpointing_does_not_count_twice(tmp_path, data_cache):
    trainer, cfg = run_steps(tmp_path, data_cache, "train.activation_checkpointing=true")
    per_step = cfg.train.batch_size * cfg.data.seq_len
    assert trainer.model.activation_checkpointing
    assert [n for _, n in trainer.model.ffns()[0].applied] == [per_step] * 3
