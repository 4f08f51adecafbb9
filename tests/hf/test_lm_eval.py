"""The lm-evaluation-harness example (examples/lm_eval) on exported models, offline: its bits per byte
equal a per-story computation with somoe's own model, and `somoe eval` on the same file is close."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from somoe.evaluate.scoring import evaluate_run
from somoe.evaluate.runs import load_run

import lm_eval  # noqa: F401  (the [hf] extra: installed by run.sh, so this test runs in CI)
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "lm_eval"
STORIES = EXAMPLE / "stories.txt"


def run_task(exported, limit=None):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    args = f"pretrained={exported.out},dtype=float32,add_bos_token=False" + (",trust_remote_code=True" if exported.trust_remote_code else "")
    out = simple_evaluate(model="hf", model_args=args, tasks=["somoe_stories"], device="cpu", batch_size=4,
                          limit=limit, task_manager=TaskManager(include_path=str(EXAMPLE)))
    return out["results"]["somoe_stories"]


@torch.no_grad()
def per_story_bits_per_byte(loaded, stories: list[str]) -> float:
    """Each story scored after [EOS], its own bytes only (no EOS target, no context from the story
    before), in the harness's rolling windows: L predictions each, the last window (fewer
    predictions) still reading a full context of L tokens."""
    L = loaded.cfg.model.max_seq_len
    nll, n_bytes = 0.0, 0
    for story in stories:
        stream = [loaded.tokenizer.eos_id] + loaded.tokenizer.encode(story)
        for first in range(1, len(stream), L):  # targets stream[first:end]
            end = min(first + L, len(stream))
            x = torch.tensor([stream[max(0, end - 1 - L):end - 1]])
            y = torch.tensor(stream[first:end])
            logp = torch.log_softmax(loaded.model(x).logits[0, -len(y):].double(), -1)
            nll -= float(logp.gather(1, y[:, None]).sum())
        n_bytes += len(story.encode("utf-8"))
    return nll / math.log(2) / n_bytes


@pytest.mark.parametrize("kind", ["gpt2_some", "smollm_moe"])
def test_lm_eval_bits_per_byte_equals_somoes_per_story_figure(kind, hf_runs, exports, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    result = run_task(exports[kind])
    stories = [s.strip() for s in STORIES.read_text().split("<|endoftext|>") if s.strip()]
    loaded = load_run(hf_runs[kind], device="cpu")
    reference = per_story_bits_per_byte(loaded, stories)
    assert result["bits_per_byte,none"] == pytest.approx(reference, rel=1e-5)
    assert result["byte_perplexity,none"] == pytest.approx(2 ** reference, rel=1e-5)
    # somoe eval joins the stories with EOS (scored, one byte each) and reads across story boundaries
    somoe_eval = evaluate_run(hf_runs[kind], data=str(STORIES), device="cpu")["bpb"]
    assert somoe_eval == pytest.approx(reference, rel=0.05)
