"""Bad input through the command line: one line naming the problem, a non-zero exit, nothing lost."""

import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import TINY
from somoe.cli import main
from somoe.train.checkpoint import list_checkpoints


def one_line_error(capsys, *argv) -> tuple[int, str]:
    code = main(list(argv))
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return code, err


def test_out_pointing_at_a_file(tmp_path, capsys):
    target = tmp_path / "notes.txt"
    target.write_text("keep me")
    code, err = one_line_error(capsys, "train", "--preset", "debug", "--out", str(target))
    assert code == 2 and "is a file, not a folder" in err
    assert target.read_text() == "keep me"


def test_binary_config_file(tmp_path, capsys):
    binary = tmp_path / "weights.yaml"
    binary.write_bytes(bytes(range(256)))
    code, err = one_line_error(capsys, "params", "--config", str(binary))
    assert code == 2 and "is not text" in err


@pytest.mark.parametrize("override,words", [
    ("model.d_model=1e9", "element weight"), ("model.vocab_size=1e15", "element weight"),
    ("train.keep_last=-1", "train.keep_last=-1 must be >= 0"), ("train.ckpt_every=-2", "train.ckpt_every=-2 must be >= 0"),
    ("train.max_bad_steps=-1", "max_bad_steps=-1"), ("train.log_every=0", "log_every=0 must be positive"),
])
def test_impossible_values_are_refused(capsys, override, words):
    code, err = one_line_error(capsys, "params", "--preset", "debug", override)
    assert code == 2 and words in err


def test_negative_max_new_tokens_fails_before_loading(tmp_path, capsys):
    code, err = one_line_error(capsys, "generate", str(tmp_path / "no-such-run"), "--max-new-tokens", "-5")
    assert code == 2 and "--max-new-tokens: -5 is out of range: give an integer >= 0" in err


def test_divergence_exits_non_zero_with_one_line(tmp_path, data_cache, capsys):
    run = tmp_path / "r"
    code, err = one_line_error(capsys, "train", "--preset", "debug", "--out", str(run), "--no-progress", *TINY,
                               f"data.cache_dir={data_cache}", "train.lr=1e3", "train.warmup_steps=0",
                               "train.grad_clip=0", "train.max_steps=40", "train.max_bad_steps=1")
    assert code == 3 and "training diverged" in err


def test_sigterm_saves_then_exits_143(tmp_path, data_cache):
    run = tmp_path / "r"
    cmd = [sys.executable, "-m", "somoe.cli", "train", "--preset", "debug", "--out", str(run), "--no-progress", *TINY,
           f"data.cache_dir={data_cache}", "train.max_steps=100000", "train.eval_every=0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (run / "metrics.jsonl").is_file() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert len(list_checkpoints(run)) == 1 and "SIGTERM received" in out
