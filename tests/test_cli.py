"""The command line end to end on a tiny run: train, eval (--json, --data), generate, params, errors."""

import json
import math

import pytest

from helpers import TINY
from somoe.cli import main


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, data_cache):
    out = tmp_path_factory.mktemp("cli") / "run"
    code = main(["train", "--preset", "debug", "--out", str(out), "--no-progress", *TINY,
                 f"data.cache_dir={data_cache}", "train.max_steps=4"])
    assert code == 0
    return out


def test_eval_json_matches_the_training_eval(tiny_run, capsys):
    capsys.readouterr()
    assert main(["eval", str(tiny_run), "--json", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {"loss", "ppl", "bpb", "tokens", "bytes"} <= result.keys()
    assert math.isclose(result["ppl"], math.exp(result["loss"]), rel_tol=1e-9)
    rows = [json.loads(l) for l in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in rows if r["kind"] == "eval"][-1]
    # the trainer capped eval at 4 batches; the full-set loss is close but covers more tokens
    assert result["tokens"] > final["val_tokens"]
    assert abs(result["loss"] - final["val_loss"]) < 0.3


def test_eval_on_a_local_file_counts_its_bytes(tiny_run, tmp_path, capsys):
    stories = ["Tom had a red ball.", "Mia saw a big cat. It was happy."]
    f = tmp_path / "two.txt"
    f.write_text("\n<|endoftext|>\n".join(stories) + "\n<|endoftext|>\n", encoding="utf-8")
    capsys.readouterr()
    assert main(["eval", str(tiny_run), "--data", str(f), "--json", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["bytes"] == sum(len(s.encode()) for s in stories) + len(stories)  # +1 per story end


def test_eval_seq_len_scores_the_same_tokens_in_other_windows(tiny_run, capsys):
    capsys.readouterr()
    assert main(["eval", str(tiny_run), "--json", "--device", "cpu"]) == 0
    default = json.loads(capsys.readouterr().out)
    assert main(["eval", str(tiny_run), "--json", "--device", "cpu", "--seq-len", "8"]) == 0
    short = json.loads(capsys.readouterr().out)
    assert (default["seq_len"], short["seq_len"]) == (32, 8)
    # every token after the first is scored once whatever the window; only its context changes
    assert (short["tokens"], short["bytes"]) == (default["tokens"], default["bytes"])
    assert abs(short["loss"] - default["loss"]) > 1e-4


@pytest.mark.parametrize("seq_len,message", [("128", "learned position embeddings stop at model.max_seq_len=32"),
                                             ("1", "too short")])
def test_eval_seq_len_refuses_windows_the_model_cannot_score(tiny_run, capsys, seq_len, message):
    capsys.readouterr()
    assert main(["eval", str(tiny_run), "--device", "cpu", "--seq-len", seq_len]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "--seq-len" in err and len(err.splitlines()) == 1


def test_generate_prints_each_prompt(tiny_run, capsys):
    capsys.readouterr()
    assert main(["generate", str(tiny_run), "--prompt", "Once upon", "--prompt", "Tom", "--greedy",
                 "--max-new-tokens", "5", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.count("-" * 40) == 2 and "Once upon" in out and "Tom" in out


def test_params_json_without_allocating(capsys):
    assert main(["params", "--preset", "seed000_gpt2", "--json"]) == 0
    counts = json.loads(capsys.readouterr().out)
    # 2*V*d (untied) + 8 blocks * (attn 4(d^2+d) + 2 LayerNorms 2*2d + MLP 2*d*4d + 4d + d) + final norm 2d
    d, v = 512, 8192
    expected = 2 * v * d + 8 * (4 * (d * d + d) + 4 * d + 8 * d * d + 5 * d) + 2 * d
    assert counts == {"total": expected, "trainable": expected}


@pytest.mark.parametrize("argv, message", [
    (["train", "--preset", "debug", "train.nope=1"], "unknown config key 'train.nope'"),
    (["train", "--preset", "debug", "model.n_heads=3"], "not divisible by model.n_heads"),
    (["eval", "/nonexistent/run"], "has no checkpoints"),
    (["train", "--preset", "debug", "train.device=gpu0"], "train.device='gpu0' is not a device"),
    (["bench", "layer", "--device", "gpu0"], "--device 'gpu0' is not a device"),  # named as the bench takes it
])
def test_errors_are_one_line_and_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_truncated_checkpoint_via_cli(tiny_run, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_run, broken)
    ckpt = sorted((broken / "checkpoints").iterdir())[-1]
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 3])
    assert main(["eval", str(broken), "--device", "cpu"]) == 2
    assert "truncated or corrupt" in capsys.readouterr().err


def test_empty_and_non_utf8_corpora_are_clear_errors(tmp_path, data_cache, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9 story".encode("latin-1"))
    for bad in (empty, latin):
        code = main(["train", "--preset", "debug", "--out", str(tmp_path / "r"), f"data.train_path={bad}",
                     f"data.cache_dir={data_cache}"])
        assert code == 2
        err = capsys.readouterr().err.strip()
        assert str(bad) in err and "\n" not in err
