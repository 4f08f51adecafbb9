"""Ablation C: only the active mode moves keys; both modes start from the same checkpoint state."""

from __future__ import annotations

import json

import torch

from somoe.analysis.adaptation import run_mode, som_state, split_shift
from somoe.evaluate.runs import file_stream, run_val_stream
from somoe.cli import main
from somoe.evaluate.runs import load_run

SHIFT_TEXT = "\n".join(  # a different register from the built-in stories: ledgers and dates
    f"Ledger entry {i}: the quarterly account of {1800 + i} recorded {i * 37 % 101} guineas, "
    f"audited by Mr. Holloway of Threadneedle Street on the {i % 28 + 1}th of March." for i in range(120))


def test_frozen_mode_keeps_som_buffers_bitwise_and_active_mode_moves_keys(some_run, tmp_path):
    shift_file = tmp_path / "shift.txt"
    shift_file.write_text(SHIFT_TEXT)
    frozen_run, active_run = load_run(some_run, device="cpu"), load_run(some_run, device="cpu")
    assert all(layer._total_steps == 6 for layer in frozen_run.model.self_organizing_layers())  # progress restored
    checkpoint_state = som_state(frozen_run.model)
    assert all(torch.equal(v, som_state(active_run.model)[k]) for k, v in checkpoint_state.items())
    data = split_shift(run_val_stream(frozen_run), file_stream(shift_file, frozen_run), 32, 2, pre=2, shift=4,
                       heldout=2)
    assert len(data.stream) == 6 and data.shift_at == 2

    frozen = run_mode(frozen_run, data, "frozen")
    active = run_mode(active_run, data, "active")

    after_frozen, after_active = som_state(frozen_run.model), som_state(active_run.model)
    assert all(torch.equal(v, after_frozen[k]) for k, v in checkpoint_state.items())
    assert frozen.key_move == 0.0
    for name in (k for k in checkpoint_state if k.endswith(".key_store")):
        moved = (after_active[name] - checkpoint_state[name]).norm(dim=1)
        assert moved.max() > 1e-4, name
        assert torch.allclose(after_active[name].norm(dim=1), torch.ones(16), atol=1e-5)  # key_norm kept
    assert active.key_move > 1e-4
    # the first batch is scored before any update: identical; later batches see different keys
    assert frozen.stream_loss[0] == active.stream_loss[0]
    assert any(abs(f - a) > 1e-7 for f, a in zip(frozen.stream_loss[1:], active.stream_loss[1:]))
    assert frozen.stream_tokens == active.stream_tokens == [2 * 32] * 6


def test_adapt_command_writes_both_modes(some_run, tmp_path):
    shift_file = tmp_path / "shift.txt"
    shift_file.write_text(SHIFT_TEXT)
    out = tmp_path / "adapt"
    assert main(["adapt", str(some_run), "--shift-data", str(shift_file), "--pre-batches", "2", "--shift-batches",
                 "3", "--heldout-batches", "2", "--batch-size", "2", "--out", str(out)]) == 0
    summary = json.loads((out / "adapt.json").read_text())
    frozen, active = summary["modes"]["frozen"], summary["modes"]["active"]
    assert len(frozen["stream_loss"]) == len(active["stream_loss"]) == 5
    assert frozen["post_in"] == summary["before"]["in"] and frozen["key_move"] == 0.0 < active["key_move"]
    assert active["post_ood"]["ppl"] > 1.0 and (out / "adapt.png").stat().st_size > 10_000
    assert "| active |" in (out / "adapt.md").read_text()
    assert main(["adapt", str(some_run), "--shift-data", str(shift_file), "--shift-batches", "500"]) == 2


def test_adapt_defaults_to_the_built_in_sherlock_holmes_text(some_run, tmp_path):
    out = tmp_path / "adapt"
    assert main(["adapt", str(some_run), "--pre-batches", "1", "--shift-batches", "2", "--heldout-batches", "1",
                 "--batch-size", "2", "--out", str(out)]) == 0
    summary = json.loads((out / "adapt.json").read_text())
    assert summary["shift_data"] == "The Adventures of Sherlock Holmes (public domain)"
    assert len(summary["modes"]["active"]["stream_loss"]) == 3
