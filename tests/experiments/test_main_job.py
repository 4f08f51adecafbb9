"""The main job (README's first command): SoME, its GPT-2 baseline and the classic MoE side by side."""

import os

import pytest

from helpers import TINY
from somoe.cli import main
from somoe.config import ConfigError, load_config
from somoe.experiments.quickstart import (LEVEL_TOLERANCE_BPB, MAIN_JOB_PRESETS, active_flops_per_token, data_overrides,
                              verdict)

SMALL_FFNS = ["model.d_ffn=64", "model.some.num_experts=8", "model.some.d_ffn=32", "model.some.theta=4",
              "model.some.som_warmup_steps=1", "model.moe.num_experts=4"]


def parse_table(printed: str) -> tuple[dict[str, int], dict[str, list[str]]]:
    table = printed.split("\nrun ")[-1].splitlines()
    header = [c.strip() for c in ("run " + table[0]).split("|")]
    rows = {line.split("|")[0].strip(): [c.strip() for c in line.split("|")] for line in table[2:5]}
    return {name: i for i, name in enumerate(header)}, rows


def test_default_main_job_compares_three_models_on_the_same_budget(tmp_path, data_cache, capsys):
    assert MAIN_JOB_PRESETS == ("cpu_gpt2", "cpu_some", "cpu_moe")
    out = tmp_path / "main"
    args = ["quickstart", "--out", str(out), *TINY, f"data.cache_dir={data_cache}", "train.max_steps=3", *SMALL_FFNS]
    assert main(args) == 0
    printed = capsys.readouterr().out
    col, rows = parse_table(printed)
    assert set(rows) == set(MAIN_JOB_PRESETS)
    assert [rows[p][col["ffn"]] for p in MAIN_JOB_PRESETS] == ["dense", "some", "moe"]
    assert rows["cpu_gpt2"][col["mid gini"]] == "-"
    assert 0.0 <= float(rows["cpu_some"][col["mid gini"]]) < 1.0
    assert 0.0 < float(rows["cpu_some"][col["mid H bits"]]) <= 3.0 + 1e-9  # log2(8 experts)
    for name in MAIN_JOB_PRESETS:  # same token budget, a finite loss, a sample each
        assert float(rows[name][col["bpb"]]) > 0
        assert f"--- {name} sample ---" in printed
        cfg = load_config(preset=name, overrides=TINY + SMALL_FFNS)
        assert float(rows[name][col["fwd MFLOP/tok"]]) == pytest.approx(active_flops_per_token(cfg.model) / 1e6,
                                                                       abs=0.006)
    assert len({rows[p][col["tokens"]] for p in MAIN_JOB_PRESETS}) == 1
    png = out / "main_job.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"{png}" in printed
    assert "routing: cpu_some middle-layer usage Gini" in printed
    assert printed.count("verdict: SoME (cpu_some) is ") == 1

    # a re-run skips the finished runs: no step is trained again, the metrics files are untouched
    before = {p: (out / p / "metrics.jsonl").read_bytes() for p in MAIN_JOB_PRESETS}
    assert main(args) == 0
    assert {p: (out / p / "metrics.jsonl").read_bytes() for p in MAIN_JOB_PRESETS} == before


def test_active_flops_count_only_the_routed_experts():
    gpt2, some, moe = (load_config(preset=p).model for p in MAIN_JOB_PRESETS)
    d, L, V, S = gpt2.d_model, gpt2.n_layers, gpt2.vocab_size, gpt2.max_seq_len
    shared = L * (2 * 4 * d * d + 2 * S * d) + 2 * d * V  # attention projections, causal scores/values, head
    assert active_flops_per_token(gpt2) == pytest.approx(shared + L * 2 * 2 * d * gpt2.d_ffn)
    k, width, h = some.some.top_k, some.some.d_ffn, some.some.query_hidden  # query MLP, scores against E keys, k experts
    assert some.some.query_net == "mlp"
    assert active_flops_per_token(some) == pytest.approx(
        shared + L * (2 * 2 * d * h + 2 * d * some.some.num_experts + k * 2 * 2 * d * width))
    m = moe.moe  # router d x E, top-k experts of the dense width
    assert active_flops_per_token(moe) == pytest.approx(
        shared + L * (2 * d * m.num_experts + m.top_k * 2 * 2 * d * (m.d_ffn or moe.d_ffn)))


def summary(bpb):
    return {"best_val_bpb": bpb}


@pytest.mark.parametrize("some,word", [(1.200, "better than"), (1.2201, "level with"), (1.2299, "level with"),
                                       (1.240, "worse than")])
def test_verdict_sign_and_tolerance(some, word):
    line = verdict({"cpu_gpt2": summary(1.22), "cpu_some": summary(some)})
    assert f"is {word} GPT-2" in line and f"{some - 1.22:+.4f}" in line and "\n" not in line
    assert f"±{LEVEL_TOLERANCE_BPB}" in line
    assert verdict({"cpu_some": summary(some)}) is None  # no baseline, no verdict


def test_bad_data_folders_are_one_line_errors_and_touch_nothing(tmp_path, data_cache, capsys):
    empty = tmp_path / "nothing"
    empty.mkdir()
    with pytest.raises(ConfigError, match="has no train.txt"):
        data_overrides(str(empty))
    with pytest.raises(ConfigError, match="no such folder"):
        data_overrides(str(tmp_path / "missing"))
    # a finished run folder, then a re-run on broken files: exit 2, one line naming the file, nothing rewritten
    out = tmp_path / "main"
    args = ["quickstart", "--out", str(out), "--presets", "cpu_gpt2", *TINY, f"data.cache_dir={data_cache}",
            "train.max_steps=2", "model.d_ffn=64"]
    assert main(args) == 0
    # every file of the run (its .lock, taken and released by each attempt, aside)
    files = {p: p.read_bytes() for p in (out / "cpu_gpt2").rglob("*") if p.is_file() and p.name != ".lock"}
    stamps = {p: os.stat(p).st_mtime_ns for p in files}
    capsys.readouterr()
    assert main(["eval", str(out / "cpu_gpt2"), "--data", str(empty), "--device", "cpu"]) == 2  # a folder, not a file
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{empty} is a directory, not a story file" in err[0]
    for name, content, needle in [("empty", b"", "holds no stories"), ("binary", b"\x00\x01\x02story", "looks binary"),
                                  ("latin", b"Caf\xe9 story\n<|endoftext|>\nMore.", "not valid UTF-8")]:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "train.txt").write_bytes(content)
        (folder / "dev.txt").write_text("A dev story.\n", encoding="utf-8")
        capsys.readouterr()
        # on other data the finished run's folder would be refused (a resume never mixes data sets):
        # a fresh --out reaches the file checks, and is not left behind
        fresh = tmp_path / f"fresh-{name}"
        assert main(["quickstart", "--out", str(fresh), *args[3:], "--data", str(folder)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0] and str(folder / "train.txt") in err[0]
        assert not fresh.exists()
        assert {p: p.read_bytes() for p in files} == files
        assert {p: os.stat(p).st_mtime_ns for p in files} == stamps
