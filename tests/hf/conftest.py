"""Session fixtures of the Hugging Face tests: one trained run per kind (see ``hf_helpers``)."""

from __future__ import annotations

import pytest
import torch

from helpers import TINY
from hf_helpers import KINDS, push_weights
from somoe.config import load_config
from somoe.hf.export import export_run
from somoe.train.trainer import Trainer


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one thread is faster, and spares the shared cores' spin-waiting threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def hf_runs(tmp_path_factory, data_cache):
    root = tmp_path_factory.mktemp("hf-runs")
    runs = {}
    for name, (overrides, _) in KINDS.items():
        cfg = load_config(preset="debug", overrides=TINY + [f"data.cache_dir={data_cache}", "train.max_steps=1",
                                                             "train.eval_every=1", "model.init_std=0.1",
                                                             "model.max_seq_len=64", *overrides])
        Trainer(cfg, root / name, progress=False, log=lambda m: None).fit()
        push_weights(root / name)
        runs[name] = root / name
    return runs


@pytest.fixture(scope="session")
def exports(hf_runs, tmp_path_factory):
    root = tmp_path_factory.mktemp("hf-exports")
    return {name: export_run(run, root / name, log=lambda m: None) for name, run in hf_runs.items()}
