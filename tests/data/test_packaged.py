"""The real text shipped as package data: its content, its licence, and loading from a non-editable install."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from somoe.data import ATTRIBUTION, builtin_ood_text, builtin_stories
from somoe.data.packaged import FILES, read_packaged_text

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared" / "data"


def test_shipped_stories_match_their_description():
    train, dev = builtin_stories("train"), builtin_stories("val")
    assert (len(train), len(dev)) == (2415, 300) and not set(train) & set(dev)
    assert sum(len(s.encode("utf-8")) for s in train) > 2_000_000  # ~2.1 MB of real stories
    assert builtin_stories("train", limit=3) == train[:3]
    text = builtin_ood_text()
    assert "Sherlock Holmes" in text and len(text) > 500_000


@pytest.mark.skipif(not (SHARED / "tinystories" / "train.txt").is_file(), reason="no shared data folder")
def test_shipped_files_are_the_shared_texts_unchanged():
    for key, source in [("train", "tinystories/train.txt"), ("val", "tinystories/dev.txt"),
                        ("ood", "ood/sherlock_holmes_adventures.txt")]:
        assert read_packaged_text(FILES[key]) == (SHARED / source).read_text(encoding="utf-8")


def test_licence_and_attribution_ship_beside_the_data():
    corpus = REPO / "src" / "somoe" / "data" / "corpus"
    licence = (corpus / "LICENSE-CDLA-Sharing-1.0.txt").read_text(encoding="utf-8")
    assert licence.startswith("Community Data License Agreement - Sharing - Version 1.0")
    assert "Section 7. Miscellaneous" in licence
    readme = (corpus / "README.md").read_text(encoding="utf-8")
    for needle in ("Eldan", "arXiv:2305.07759", "roneneldan/TinyStories", "Changes made to the data"):
        assert needle in readme and (needle in ATTRIBUTION or needle == "Changes made to the data")


def test_prepare_prints_the_attribution(tmp_path, capsys):
    from somoe.cli import main

    assert main(["prepare", "--preset", "debug", "--out", str(tmp_path / "run"), "data.builtin_train_stories=50",
                 "data.builtin_val_stories=5", "data.tokenizer_train_stories=50", "model.vocab_size=300",
                 f"data.cache_dir={tmp_path / 'cache'}"]) == 0
    printed = capsys.readouterr().out
    assert "Eldan" in printed and "roneneldan/TinyStories" in printed and "CDLA-Sharing-1.0" in printed


@pytest.mark.slow
def test_a_non_editable_install_loads_the_packaged_stories(tmp_path):
    """pip builds a wheel from the checkout and installs it into a folder (no network, no editable
    link); a Python started elsewhere imports somoe from there and reads the stories and the licence."""
    source, target = tmp_path / "checkout", tmp_path / "site"  # a copy, so that the build leaves the repo alone
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    build = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                            "--no-index", "--target", str(target), str(source)], capture_output=True, text=True,
                           cwd=tmp_path, env={**os.environ, "PIP_NO_CACHE_DIR": "1"})
    assert build.returncode == 0, build.stderr[-2000:]
    code = ("import somoe, pathlib, importlib.resources as r; from somoe.data import builtin_stories, builtin_ood_text;"
            "print(pathlib.Path(somoe.__file__).parent);"
            "print(len(builtin_stories('train')), len(builtin_stories('val')), len(builtin_ood_text()) > 500000);"
            "print(r.files('somoe.data').joinpath('corpus', 'LICENSE-CDLA-Sharing-1.0.txt').read_text()[:32])")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(target)})
    assert run.returncode == 0, run.stderr[-2000:]
    where, counts, licence = run.stdout.splitlines()
    assert Path(where) == target / "somoe"  # the installed copy, not the checkout
    assert counts == "2415 300 True" and licence == "Community Data License Agreement"


def test_a_missing_packaged_file_is_a_one_line_error():
    from somoe.config import ConfigError

    with pytest.raises(ConfigError, match="nope.txt.xz is missing from this somoe install; reinstall somoe"):
        read_packaged_text("nope.txt.xz")
