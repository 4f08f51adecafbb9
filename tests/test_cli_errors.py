"""The CLI's one place for errors, the writers' clean-up on failure, and small command-line contracts."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest

import somoe.hf.export as hf_export
import somoe.hf.import_hf as hf_import
from helpers import TINY
from somoe.cli import main
from somoe.commands._outputs import new_output, remove_new_outputs
from somoe.config import ConfigError


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_cache):
    out = tmp_path_factory.mktemp("errors") / "run"
    assert main(["train", "--preset", "debug", "--out", str(out), "--no-progress", *TINY,
                 f"data.cache_dir={data_cache}", "train.max_steps=2", "train.eval_every=0"]) == 0
    return out


@pytest.fixture(scope="module")
def hf_folder(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("hf") / "gpt2"
    assert main(["export", str(run), str(out)]) == 0
    return out


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


# --- one place maps exceptions to the line -----------------------------------------------------------
def _fail_report_with(monkeypatch, exc):
    import somoe.report.summary

    def boom(run_dir):
        raise exc

    monkeypatch.setattr(somoe.report.summary, "write_report", boom)


def test_an_unexpected_oserror_is_one_line_naming_the_file_and_the_fix(monkeypatch, tmp_path, capsys):
    _fail_report_with(monkeypatch, PermissionError(errno.EACCES, "Permission denied", "/data/run/summary.txt"))
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == ("error: /data/run/summary.txt is not writable (Permission denied); "
                   "choose a folder you can write to\n")


def test_somoe_debug_shows_the_traceback_of_a_mapped_error(monkeypatch, tmp_path):
    _fail_report_with(monkeypatch, PermissionError(errno.EACCES, "Permission denied", "/data/run/summary.txt"))
    monkeypatch.setenv("SOMOE_DEBUG", "1")
    with pytest.raises(PermissionError):
        main(["report", str(tmp_path)])


def test_a_json_parse_error_is_one_line(monkeypatch, tmp_path, capsys):
    _fail_report_with(monkeypatch, json.JSONDecodeError("Expecting value", "{x", 1))
    assert main(["report", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: invalid JSON at line 1 column 2 (Expecting value)")


def test_a_bug_keeps_its_traceback(monkeypatch, tmp_path):
    _fail_report_with(monkeypatch, ZeroDivisionError("division by zero"))
    with pytest.raises(ZeroDivisionError):
        main(["report", str(tmp_path)])


def test_an_argparse_error_is_one_line(capsys):
    assert main(["generate", "RUN", "--top-p", "nan"]) == 2
    assert capsys.readouterr().err == ("error: somoe generate: argument --top-p: nan is out of range: give a number "
                                       "> 0 and <= 1; see `somoe generate --help`\n")


# --- the three inputs first found by hand ------------------------------------------------------------
def test_import_hf_with_invalid_config_json(hf_folder, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in hf_folder.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    (bad / "config.json").write_text('{"model_type": "gpt2",,}', encoding="utf-8")
    assert main(["import-hf", str(bad), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == (f"error: {bad / 'config.json'} is not valid JSON (line 1, column 23: Expecting "
                                       f"property name enclosed in double quotes); re-save the model folder "
                                       f"(save_pretrained) or download it again\n")
    assert files_under(tmp_path) == files_under(tmp_path) & ({"bad"} | {f"bad/{f.name}" for f in bad.iterdir()})


def test_import_hf_onto_an_existing_file_leaves_no_import_tmp(hf_folder, tmp_path, capsys):
    target = tmp_path / "afile.txt"
    target.write_text("keep me", encoding="utf-8")
    assert main(["import-hf", str(hf_folder), "--out", str(target)]) == 2
    assert capsys.readouterr().err == f"error: --out {target} is a file, not a folder; choose another --out\n"
    assert files_under(tmp_path) == {"afile.txt"} and target.read_text() == "keep me"


def test_export_under_a_file(run, tmp_path, capsys):
    (tmp_path / "afile.txt").write_text("keep me", encoding="utf-8")
    out = tmp_path / "afile.txt" / "sub"
    assert main(["export", str(run), str(out)]) == 2
    assert capsys.readouterr().err == f"error: OUT {out}: {tmp_path / 'afile.txt'} is a file, not a folder; choose another OUT\n"
    assert files_under(tmp_path) == {"afile.txt"}


# --- every writer removes its temporary folder when it fails -------------------------------------------
def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device", "x")


def test_export_removes_its_tmp_folder_when_a_write_fails(run, tmp_path, monkeypatch):
    monkeypatch.setattr(hf_export, "write_tokenizer", _disk_full)  # after the weights and config.json
    with pytest.raises(ConfigError, match="cannot be written"):
        hf_export.export_run(run, tmp_path / "out", log=lambda m: None)
    assert files_under(tmp_path) == set()


def test_import_hf_removes_its_import_tmp_folder_when_a_write_fails(hf_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(hf_import, "save_checkpoint", _disk_full)  # after tokenizer.json and config.yaml
    with pytest.raises(ConfigError, match="cannot be written"):
        hf_import.import_hf(hf_folder, tmp_path / "out", log=lambda m: None)
    assert files_under(tmp_path) == set()


def test_a_failed_command_removes_the_output_folders_it_created(run, tmp_path, capsys):
    out = tmp_path / "new" / "deeper" / "analysis"
    assert main(["analyze", str(run), "--out", str(out)]) == 2  # a dense run has no key stores
    assert "error:" in capsys.readouterr().err
    assert files_under(tmp_path) == set()  # "new" too: the topmost folder the command created


def test_an_output_folder_holding_a_checkpoint_is_kept(tmp_path):
    class Args:
        pass

    args = Args()
    out = new_output(args, tmp_path / "top" / "run")
    (out / "checkpoints" / "step-00000002").mkdir(parents=True)
    (out / "checkpoints" / "step-00000002" / "model.safetensors").write_bytes(b"weights")
    remove_new_outputs(args)
    assert (out / "checkpoints" / "step-00000002" / "model.safetensors").is_file()
    (out / "checkpoints" / "step-00000002" / "model.safetensors").unlink()
    remove_new_outputs(args)
    assert not (tmp_path / "top").exists()


# --- small things ------------------------------------------------------------------------------------
def test_sweep_takes_overrides_after_its_options(tmp_path, capsys):
    data = tmp_path / "stories"
    data.mkdir()
    (data / "train.txt").write_text("Tom had a ball.\n<|endoftext|>\n", encoding="utf-8")
    assert main(["sweep", "ablation_a_cpu", "--dry-run", "--data", str(data), "train.max_steps=7"]) == 0
    capsys.readouterr()
    # the override after --data reaches every run: a bad one is refused, naming it
    assert main(["sweep", "ablation_a_cpu", "--dry-run", "--data", str(data), "train.max_steps=-7"]) == 2
    assert capsys.readouterr().err == "error: train.max_steps=-7 must be >= 0\n"


def test_an_argument_that_is_not_an_override_is_still_refused(capsys):
    assert main(["sweep", "ablation_a_cpu", "--dry-run", "stray"]) == 2
    assert "unrecognized arguments: stray" in capsys.readouterr().err


def test_bench_memory_quick_measures_a_short_step(capsys):
    assert main(["bench", "memory", "--quick", "--preset", "cpu_gpt2", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)["rows"][0]
    assert (row["seq_len"], row["batch"]) == (64, 1) and row["rss_peak_bytes"] > 0
