"""Tiny trained runs shared by the analysis tests (trained once per module that asks)."""

from __future__ import annotations

import pytest
from helpers import tiny_config

from somoe.train.trainer import Trainer

SOME = ["model.ffn=some", "model.some.num_experts=16", "model.some.top_k=2", "model.some.d_ffn=32",
        "model.some.alpha=0.05", "model.some.beta=0.01", "model.some.delta=0.01", "model.some.som_warmup_steps=2",
        "train.keep_last=0"]


def train_tiny(run_dir, cache, *overrides):
    Trainer(tiny_config(cache, *overrides), run_dir, progress=False, log=lambda *_: None).fit()
    return run_dir


@pytest.fixture(scope="module")
def some_run(tmp_path_factory, data_cache):
    """A 6-step SoME run with checkpoints at steps 3 and 6 (som warmup 2 steps: the end-of-training rates
    differ from the first steps')."""
    return train_tiny(tmp_path_factory.mktemp("some") / "some_run", data_cache, *SOME)


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory, data_cache):
    return train_tiny(tmp_path_factory.mktemp("dense") / "dense_run", data_cache)
