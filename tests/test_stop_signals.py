"""A signal stops the whole job: each verb that trains is sent a real SIGTERM/SIGINT in a subprocess.

The job must save the run it is training, start no other, exit 143 (SIGTERM) or 130 (SIGINT), and a
rerun of the same command must resume that run from the saved step.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import TINY
from somoe.train.checkpoint import list_checkpoints, read_trainer_state

SOMOE_SRC = os.pathsep.join([str(Path(__import__("somoe").__file__).parents[1]),
                             *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))])
LONG = ["train.max_steps=100000", "train.eval_every=0"]  # never finishes on its own


def start(argv: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": SOMOE_SRC, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    # a user's Ctrl-C reaches a process whose SIGINT is at its default: a test run started in the background
    # (CI, nohup) hands its children SIGINT ignored, and Python then leaves it ignored
    return subprocess.Popen([sys.executable, "-m", "somoe", *argv], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def signal_when_training(proc: subprocess.Popen, run: Path, sig: int, steps: int = 2) -> tuple[str, str]:
    """Send ``sig`` once ``run`` has logged ``steps`` train records; (stdout, stderr) of the process."""
    deadline = time.time() + 180
    metrics = run / "metrics.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and metrics.read_text(encoding="utf-8").count('"kind": "train"') >= steps:
            break
        time.sleep(0.1)
    assert proc.poll() is None, proc.communicate()
    os.kill(proc.pid, sig)
    return proc.communicate(timeout=180)


def saved_step(run: Path) -> int:
    ckpts = list_checkpoints(run)
    assert len(ckpts) == 1, ckpts
    return read_trainer_state(ckpts[0])["step"]


def check_stop_and_resume(argv: list[str], cwd: Path, first: Path, second: Path) -> None:
    """SIGTERM during ``first``: exit 143, ``second`` never started. Rerun: ``first`` resumes at the saved
    step; SIGINT then: exit 130."""
    out, err = signal_when_training(start(argv, cwd), first, signal.SIGTERM)
    assert_code = re.search(r"SIGTERM received: saving a checkpoint at step (\d+)", out)
    assert assert_code, (out, err)
    step = saved_step(first)
    assert int(assert_code.group(1)) == step
    assert not second.exists(), "the next run started after the signal"
    records = (first / "metrics.jsonl").read_text(encoding="utf-8").count('"kind": "train"')

    proc = start(argv, cwd)
    out2, err2 = signal_when_training(proc, first, signal.SIGINT, steps=records + 1)
    assert proc.returncode == 130, (out2, err2)
    assert f"at step {step}" in out2 and re.search(rf"resumed from \S*step-{step:08d} at step {step}", out2), out2
    assert not second.exists()


def test_train_sigterm_summary_reports_the_checkpoint_step(tmp_path, data_cache):
    run = tmp_path / "r"
    proc = start(["train", "--preset", "debug", "--out", str(run), "--no-progress", *TINY,
                  f"data.cache_dir={data_cache}", *LONG, "train.log_every=7"], tmp_path)
    signal_when_training(proc, run, signal.SIGTERM, steps=1)
    assert proc.returncode == 143
    step = saved_step(run)
    summary = (run / "summary.txt").read_text(encoding="utf-8")
    assert f"steps: {step} " in summary, (step, summary)


def test_quickstart_stops_on_a_signal_and_resumes(tmp_path, data_cache):
    out = tmp_path / "job"
    argv = ["quickstart", "--presets", "debug,cpu_gpt2", "--out", str(out), *TINY, f"data.cache_dir={data_cache}",
            *LONG]
    check_stop_and_resume(argv, tmp_path, out / "debug", out / "cpu_gpt2")


def test_sweep_stops_on_a_signal_and_resumes(tmp_path, data_cache):
    sweep = tmp_path / "two.yaml"
    sweep.write_text("preset: debug\nruns:\n  a: [train.seed=1]\n  b: [train.seed=2]\n", encoding="utf-8")
    out = tmp_path / "sweep"
    # the overrides after the options (somoe sweep NAME --out DIR key=value) reach every run
    argv = ["sweep", str(sweep), "--out", str(out), *TINY, f"data.cache_dir={data_cache}", *LONG]
    check_stop_and_resume(argv, tmp_path, out / "a", out / "b")


def test_transition_stops_on_a_signal_and_resumes(tmp_path, data_cache):
    out = tmp_path / "tr"
    argv = ["transition", "--preset", "cpu_transition", "--out", str(out), "--no-progress", *TINY,
            f"data.cache_dir={data_cache}", *LONG]
    check_stop_and_resume(argv, tmp_path, out / "dense", out / "moe")


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_outside_training_exits_with_its_code_and_leaves_no_output(tmp_path, sig, code):
    """``somoe bench layer`` trains nothing (like adapt and upcycle): the signal still gives 128 + its number."""
    proc = start(["bench", "layer", "--tokens", "4096", "--reps", "1000"], tmp_path)
    time.sleep(4)  # past the imports, inside the measurement
    os.kill(proc.pid, sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "interrupted"
