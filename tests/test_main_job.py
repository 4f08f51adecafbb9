"""The main job (README's first command): SoME and its GPT-2 baseline side by side."""

from helpers import TINY
from somoe.cli import main
from somoe.quickstart import MAIN_JOB_PRESETS


def test_default_main_job_compares_cpu_gpt2_and_cpu_some(tmp_path, data_cache, capsys):
    assert MAIN_JOB_PRESETS == ("cpu_gpt2", "cpu_some")
    out = tmp_path / "main"
    code = main(["quickstart", "--out", str(out), *TINY, f"data.cache_dir={data_cache}", "train.max_steps=3",
                 "model.d_ffn=64", "model.some.num_experts=8", "model.some.d_ffn=32", "model.some.theta=4",
                 "model.some.som_warmup_steps=1"])
    assert code == 0
    printed = capsys.readouterr().out
    table = printed.split("\nrun ")[-1].splitlines()
    header = [c.strip() for c in ("run " + table[0]).split("|")]
    rows = {line.split("|")[0].strip(): [c.strip() for c in line.split("|")] for line in table[2:4]}
    assert set(rows) == {"cpu_gpt2", "cpu_some"}
    col = {name: i for i, name in enumerate(header)}
    assert rows["cpu_gpt2"][col["ffn"]] == "dense" and rows["cpu_some"][col["ffn"]] == "some"
    assert rows["cpu_gpt2"][col["mid gini"]] == "-"
    assert 0.0 <= float(rows["cpu_some"][col["mid gini"]]) < 1.0
    assert 0.0 < float(rows["cpu_some"][col["mid H bits"]]) <= 3.0 + 1e-9  # log2(8 experts)
    for name in ("cpu_gpt2", "cpu_some"):  # same token budget, a finite loss, a sample each
        assert float(rows[name][col["val loss"]]) > 0
        assert f"--- {name} sample ---" in printed
    assert rows["cpu_gpt2"][col["tokens"]] == rows["cpu_some"][col["tokens"]]
