"""Training never loses the best model: non-finite steps, best tracking, full disks, one writer, torn logs."""

import json
import os
import subprocess
import sys
from collections import namedtuple

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from helpers import tiny_config
from somoe.metrics import EvalResult
from somoe.evaluate.runs import load_run, resolve_checkpoint
from somoe.train import checkpoint as ckpt_module
from somoe.train import trainer as trainer_module
from somoe.train.checkpoint import CheckpointError, check_checkpoint, list_checkpoints, read_best, read_trainer_state
from somoe.train.nonfinite import TrainingDiverged, optimizer_step_if
from somoe.train.run_lock import RunLockError
from somoe.train.trainer import Trainer

SOME = ["model.ffn=some", "model.some.num_experts=8", "model.some.top_k=2", "model.some.d_ffn=64",
        "model.some.alpha=0.05", "model.some.beta=0.01", "model.some.delta=0.01", "model.some.som_warmup_steps=0"]


def quiet(cfg, run_dir, **kw):
    return Trainer(cfg, run_dir, progress=False, log=lambda m: None, **kw)


def records(run_dir, kind):
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if f'"{kind}"' in l]


# --- non-finite steps ---------------------------------------------------------------------------
class PoisonOnce(torch.nn.Module):
    """Wraps the forward model; the next ``calls`` forwards return a NaN loss (the statistics stay real)."""

    def __init__(self, inner, calls=1):
        super().__init__()
        self.inner, self.calls = inner, calls

    def forward(self, x, y):
        out = self.inner(x, y)
        if self.calls > 0:
            self.calls -= 1
            out.ce_loss = out.ce_loss * float("nan")
        return out


def _state(trainer):
    model = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    optim = {(i, k): v.clone() for i, s in enumerate(trainer.optimizer.state.values()) for k, v in s.items()}
    return model, optim


@pytest.mark.parametrize("extra", [[], SOME], ids=["dense", "some"])
def test_a_nan_step_changes_nothing_but_the_step_count(tmp_path, data_cache, extra):
    trainer = quiet(tiny_config(data_cache, *extra, "train.max_steps=4"), tmp_path / "r")
    trainer.train_step()  # AdamW state exists from here on
    before_model, before_optim = _state(trainer)
    trainer.forward_model = PoisonOnce(trainer.forward_model)
    trainer.train_step()
    after_model, after_optim = _state(trainer)
    assert trainer.step == 2 and int(trainer._bad_steps) == 1
    for k in before_model:  # weights, SoME keys, usage EMA, dormancy streaks ...
        if k.endswith("som_updates"):
            continue
        assert torch.equal(before_model[k], after_model[k]), k
    assert all(torch.equal(before_optim[k], after_optim[k]) for k in before_optim)  # moments and step counts
    trainer.train_step()  # a good step moves them again
    assert any(not torch.equal(before_model[k], v) for k, v in _state(trainer)[0].items())
    assert int(trainer._bad_steps) == 1


def test_fused_adamw_skips_on_the_device_flag():
    for fused in (True, False):
        p = torch.nn.Parameter(torch.ones(3))
        opt = torch.optim.AdamW([p], lr=0.1, fused=fused)
        p.grad = torch.ones(3)
        optimizer_step_if(opt, torch.tensor(True))
        kept, moments = p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}
        p.grad = torch.full((3,), float("nan"))
        optimizer_step_if(opt, torch.tensor(False))
        assert torch.equal(p.detach(), kept) and float(opt.state[p]["step"]) == 1.0
        assert all(torch.equal(v, opt.state[p][k]) for k, v in moments.items())
        assert not hasattr(opt, "found_inf")


def test_divergence_stops_with_an_error_and_keeps_the_best_checkpoint(tmp_path, data_cache):
    run = tmp_path / "r"
    cfg = tiny_config(data_cache, "train.lr=1e3", "train.warmup_steps=0", "train.max_steps=30", "train.eval_every=1",
                      "train.grad_clip=0", "train.keep_last=1", "train.max_bad_steps=2")
    trainer = quiet(cfg, run)
    with pytest.raises(TrainingDiverged, match=r"training diverged: 3 steps .*max_bad_steps=2.*best checkpoint"):
        trainer.fit()
    assert trainer.step < 30
    best = read_best(run)
    assert best is not None and best == trainer.best_step
    assert (run / "checkpoints" / f"step-{best:08d}").is_dir()
    for path in list_checkpoints(run):  # nothing non-finite was ever published
        assert all(torch.isfinite(t).all() for t in load_file(str(path / "model.safetensors")).values()
                   if t.is_floating_point())
    evals = records(run, "eval")
    assert read_trainer_state(resolve_checkpoint(run, "best"))["best_val"] == min(r["val_loss"] for r in evals)


def test_a_non_finite_checkpoint_is_refused_on_load(tmp_path, data_cache):
    from safetensors.torch import save_file

    run = tmp_path / "r"
    quiet(tiny_config(data_cache, "train.max_steps=1", "train.eval_every=0"), run).fit()
    weights = list_checkpoints(run)[-1] / "model.safetensors"
    state = load_file(str(weights))
    name = next(k for k, t in state.items() if t.is_floating_point())
    state[name][0] = float("nan")  # as written by a version that saved diverged weights
    save_file(state, str(weights))
    with pytest.raises(CheckpointError, match=rf"holds non-finite weights \({name}\)"):
        load_run(run, device="cpu")


# --- the best checkpoint --------------------------------------------------------------------------
@pytest.mark.parametrize("losses,best", [({3: 1.0, 6: 2.0, 8: 3.0}, 3), ({3: 2.0, 6: 3.0, 8: 1.0}, 8)],
                         ids=["best-between-saves", "best-at-the-final-eval"])
def test_best_checkpoint_exists_survives_pruning_and_is_not_stale(tmp_path, data_cache, monkeypatch, losses, best):
    def fake_evaluate(model, windows, *args, **kwargs):
        return EvalResult(loss=losses[trainer.step], ppl=1.0, bpb=1.0, tokens=1, bytes=1)

    monkeypatch.setattr(trainer_module, "evaluate", fake_evaluate)
    run = tmp_path / "r"
    trainer = quiet(tiny_config(data_cache, "train.max_steps=8", "train.eval_every=3", "train.ckpt_every=4",
                                "train.keep_last=1"), run)
    trainer.fit()
    assert read_best(run) == best
    assert resolve_checkpoint(run, "best").name == f"step-{best:08d}"
    assert {p.name for p in list_checkpoints(run)} == {f"step-{best:08d}", "step-00000008"}
    final = read_trainer_state(list_checkpoints(run)[-1])
    assert (final["best_step"], final["best_val"]) == (best, losses[best])


# --- a full disk ----------------------------------------------------------------------------------
def test_full_disk_is_one_line_keeps_the_previous_checkpoint_and_resume_works(tmp_path, data_cache, monkeypatch):
    real_save, attempts = ckpt_module.save_file, []

    def save_file(tensors, path, *a, **kw):
        if "step-00000004" in path:
            attempts.append(path)
            raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                                  'message: "No space left on device" })')
        return real_save(tensors, path, *a, **kw)

    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(ckpt_module, "save_file", save_file)
    monkeypatch.setattr(ckpt_module.shutil, "disk_usage", lambda p: Usage(10, 10, 3 * 2**20))
    run = tmp_path / "r"
    cfg = tiny_config(data_cache, "train.max_steps=4", "train.ckpt_every=2", "train.eval_every=0")
    with pytest.raises(CheckpointError) as err:
        quiet(cfg, run).fit()
    message = str(err.value)
    assert "\n" not in message and str(run / "checkpoints") in message and "3.0 MiB are free" in message
    assert "No space left on device" in message
    assert len(attempts) == 1  # not retried by the end-of-training save
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000002"]  # no .tmp left
    check_checkpoint(run / "checkpoints" / "step-00000002")

    monkeypatch.setattr(ckpt_module, "save_file", real_save)  # space freed
    resumed = quiet(cfg, run, resume="auto")
    assert resumed.step == 2
    resumed.fit()
    assert [p.name for p in list_checkpoints(run)][-1] == "step-00000004"


# --- one writer per run folder --------------------------------------------------------------------
def test_second_writer_gets_the_holders_pid_and_a_killed_holder_frees_the_folder(tmp_path, data_cache):
    run = tmp_path / "r"
    run.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from somoe.train.run_lock import acquire_run_lock; "
                               f"acquire_run_lock({str(run)!r}); print('locked', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        cfg = tiny_config(data_cache, "train.max_steps=2")
        with pytest.raises(RunLockError, match=rf"in use by process {holder.pid} "):
            quiet(cfg, run)
        assert not (run / "metrics.jsonl").exists() and not (run / "config.yaml").exists()  # nothing touched
    finally:
        holder.kill()  # kill -9: the kernel drops the lock with the process
        holder.wait()
    quiet(cfg, run).fit()
    assert [p.name for p in list_checkpoints(run)] == ["step-00000002"]


# --- a torn metrics.jsonl -------------------------------------------------------------------------
def test_torn_last_metrics_line_is_skipped_by_resume_and_report(tmp_path, data_cache, capsys):
    from somoe.report.summary import summarize_run

    run = tmp_path / "r"
    cfg = tiny_config(data_cache, "train.max_steps=2", "train.eval_every=0")
    quiet(cfg, run).fit()
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"kind": "train", "step": 3, "lo')  # a kill mid-append
    summary = summarize_run(run)
    assert summary["steps"] == 2 and "skipping its last line" in capsys.readouterr().err
    cfg4 = tiny_config(data_cache, "train.max_steps=4", "train.eval_every=0")
    quiet(cfg4, run, resume="auto").fit()
    steps = [r["step"] for r in records(run, "train")]
    assert steps == [1, 2, 3, 4]


# --- resume hygiene -------------------------------------------------------------------------------
def test_resume_warns_about_changed_settings_and_records_them(tmp_path, data_cache):
    run = tmp_path / "r"
    quiet(tiny_config(data_cache, "train.max_steps=2", "train.eval_every=0"), run).fit()
    messages = []
    Trainer(tiny_config(data_cache, "train.max_steps=4", "train.eval_every=0", "train.lr=1e-3"), run, resume="auto",
            progress=False, log=messages.append)
    assert any("changed config" in m and "train.lr: 0.003 -> 0.001" in m for m in messages)
    history = [json.loads(l) for l in (run / "config_history.jsonl").read_text().splitlines()]
    assert history == [{"step": 2, "changes": {"train.lr": [0.003, 0.001], "train.max_steps": [2, 4]}}]


def test_resuming_a_finished_run_adds_no_records(tmp_path, data_cache):
    run = tmp_path / "r"
    cfg = tiny_config(data_cache, "train.max_steps=3", "train.eval_every=0")
    quiet(cfg, run).fit()
    before = (run / "metrics.jsonl").read_text()
    quiet(cfg, run, resume="auto").fit()
    assert (run / "metrics.jsonl").read_text() == before


def test_tokenizer_mismatch_is_refused_by_load_and_resume(tmp_path, data_cache):
    run = tmp_path / "r"
    cfg = tiny_config(data_cache, "train.max_steps=2", "train.eval_every=0")
    quiet(cfg, run).fit()
    load_run(run, device="cpu")  # its own tokenizer: fine
    tok = json.loads((run / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # same size, two tokens swapped
    for path in (run / "tokenizer.json", list_checkpoints(run)[-1] / "tokenizer.json"):
        path.write_text(json.dumps(tok))
    with pytest.raises(CheckpointError, match="is not the one step-00000002 was trained with"):
        load_run(run, device="cpu")
    with pytest.raises(CheckpointError, match="is not the one"):
        quiet(tiny_config(data_cache, "train.max_steps=4", "train.eval_every=0"), run, resume="auto")


def test_architecture_mismatch_names_the_keys_and_shapes(tmp_path, data_cache):
    from somoe.models import build_model
    from somoe.train.checkpoint import load_model_state

    run = tmp_path / "r"
    quiet(tiny_config(data_cache, "train.max_steps=1", "train.eval_every=0"), run).fit()
    other = build_model(tiny_config(data_cache, "model.n_layers=3", "model.vocab_size=384").model, torch.device("cpu"))
    with pytest.raises(CheckpointError) as err:
        load_model_state(list_checkpoints(run)[-1], other)
    message = str(err.value)
    assert "missing from the checkpoint: blocks.2." in message
    assert "(320, 32) vs (384, 32)" in message and "\n" not in message


def test_eval_set_does_not_depend_on_accumulation(tmp_path, data_cache):
    tokens = [quiet(tiny_config(data_cache, f"train.grad_accum={g}"), tmp_path / str(g)).run_eval()["val_tokens"]
              for g in (1, 4)]
    assert tokens[0] == tokens[1] > 0
