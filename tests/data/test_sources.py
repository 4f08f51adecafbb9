"""Story files (.txt/.jsonl/.parquet), data.source resolution, hub loading, cache keys."""

from __future__ import annotations

import json
import os
import sys
import types

import pytest

from somoe.config import ConfigError, DataConfig
from somoe.data import load_stories, read_story_file
from somoe.data.sources import source_key


def write(path, text: str | bytes):
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


def one_line_error(exc_info) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg
    return msg


def test_txt_split_strip_and_drop_empty(tmp_path):
    f = write(tmp_path / "s.txt", "  Story one.\nSecond “line”.\n<|endoftext|>\n\n<|endoftext|>\r\nStory two.\r\n"
                                  "Para two.\n<|endoftext|>\n")
    assert read_story_file(f) == ["Story one.\nSecond “line”.", "Story two.\nPara two."]


def test_txt_without_separator_is_one_story(tmp_path):
    assert read_story_file(write(tmp_path / "a.txt", "\nJust text.\n")) == ["Just text."]


def test_jsonl(tmp_path):
    f = write(tmp_path / "s.jsonl", json.dumps({"text": " A é "}) + "\n\n" + json.dumps({"text": "B", "id": 3}) + "\n")
    assert read_story_file(f) == ["A é", "B"]


@pytest.mark.parametrize("name,content,needle", [
    ("missing.txt", None, "not found"),
    ("empty.txt", "", "no stories"),
    ("blank.txt", "\n<|endoftext|>\n  \n", "no stories"),
    ("latin.txt", b"Caf\xe9 story", "offset 3"),
    ("binary.txt", b"PK\x03\x04\x00\x00story", "looks binary (NUL byte at offset 4)"),
    ("folder", "dir", "is a directory, not a story file"),
    ("tinystories.txt", "dir", "pass a file inside it"),
    ("bad.jsonl", '{"text": "ok"}\n{"story": "no text"}\n', "line 2"),
    ("broken.jsonl", '{"text": "ok"}\n{oops\n', "line 2 is not valid JSON"),
    ("table.csv", "text\nhello\n", "unknown story file type '.csv'"),
])
def test_bad_files_raise_one_line_config_errors(tmp_path, name, content, needle):
    path = tmp_path / name
    if content == "dir":
        path.mkdir()
    elif content is not None:
        write(path, content)
    with pytest.raises(ConfigError) as e:
        read_story_file(path)
    msg = one_line_error(e)
    assert needle in msg and name in msg
    if name == "latin.txt":
        assert "re-encode it as UTF-8" in msg


def test_parquet_without_pyarrow_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # makes `import pyarrow...` raise ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ConfigError) as e:
        read_story_file(write(tmp_path / "s.parquet", b"PAR1"))
    assert "pip install somoe[parquet]" in one_line_error(e)


def test_files_with_and_without_val_path(tmp_path):
    stories = [f"Story number {i}." for i in range(20)]
    train = write(tmp_path / "train.txt", "".join(f"{s}\n<|endoftext|>\n" for s in stories))
    val = write(tmp_path / "val.jsonl", json.dumps({"text": "Held out."}) + "\n")
    cfg = DataConfig(train_path=str(train), val_path=str(val))
    assert load_stories(cfg, "train") == stories and load_stories(cfg, "val") == ["Held out."]
    cfg = DataConfig(source="files", train_path=str(train), val_fraction=0.1)  # last 10% = 2 stories
    assert load_stories(cfg, "train") == stories[:18] and load_stories(cfg, "val") == stories[18:]


def test_single_story_file_cannot_be_split(tmp_path):
    cfg = DataConfig(train_path=str(write(tmp_path / "one.txt", "Only one.")))
    with pytest.raises(ConfigError, match="val_path"):
        load_stories(cfg, "val")


def test_builtin_is_the_shipped_real_stories_with_optional_caps():
    train, val = load_stories(DataConfig(), "train"), load_stories(DataConfig(), "val")
    assert (len(train), len(val)) == (2415, 300)  # all of the shipped train.txt and dev.txt
    assert not set(train) & set(val)
    assert train[0].startswith("Once upon a time there was a little boy named Ben.")
    assert all("<|endoftext|>" not in s and s == s.strip() for s in train + val)
    capped = DataConfig(builtin_train_stories=5, builtin_val_stories=3)
    assert load_stories(capped, "train") == train[:5] and load_stories(capped, "val") == val[:3]
    with pytest.raises(ConfigError, match="builtin_train_stories=-1 must be >= 0"):
        DataConfig(builtin_train_stories=-1).validate()


def test_files_source_needs_a_path():
    with pytest.raises(ConfigError, match="train_path"):
        load_stories(DataConfig(source="files"), "train")


def fake_datasets(monkeypatch, load_dataset):
    module = types.ModuleType("datasets")
    module.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", module)


def test_hub_streams_only_the_first_rows(monkeypatch):
    calls, pulled = [], []

    def load_dataset(name, split, streaming=False):
        calls.append((name, split, streaming))

        def rows():  # endless: the loader must stop by itself
            i = 0
            while True:
                pulled.append(i)
                yield {"text": f" {split} story {i} "}
                i += 1
        return rows()

    fake_datasets(monkeypatch, load_dataset)
    cfg = DataConfig(source="tinystories", hub_dataset="org/stories", hub_train_stories=4, hub_val_stories=2)
    assert load_stories(cfg, "train") == [f"train story {i}" for i in range(4)]
    assert len(pulled) == 4
    assert load_stories(cfg, "val") == ["validation story 0", "validation story 1"]
    assert calls == [("org/stories", "train", True), ("org/stories", "validation", True)]


def test_hub_errors(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    cfg = DataConfig(source="tinystories")
    with pytest.raises(ConfigError) as e:
        load_stories(cfg, "train")
    assert "pip install somoe[hub]" in one_line_error(e)

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach huggingface.co\nsecond line")

    fake_datasets(monkeypatch, offline)
    with pytest.raises(ConfigError) as e:
        load_stories(cfg, "train")
    msg = one_line_error(e)
    assert "data.source=builtin" in msg and "data.train_path=FILE" in msg and "Couldn't reach" in msg


def test_source_keys(tmp_path):
    f = write(tmp_path / "t.txt", "A.\n<|endoftext|>\nB.\n")
    files = DataConfig(train_path=str(f))
    key = source_key(files)
    assert str(f.resolve()) in key and source_key(files) == key
    assert source_key(DataConfig(train_path=str(f), val_fraction=0.2)) != key  # a different cut point
    write(f, "A.\n<|endoftext|>\nB!!\n")
    os.utime(f, ns=(1, 1))
    assert source_key(files) != key  # edited file -> new key

    builtin = DataConfig(builtin_train_stories=10, builtin_val_stories=2)
    assert source_key(builtin, "train") != source_key(builtin, "val")
    assert source_key(builtin, "train") == source_key(DataConfig(builtin_train_stories=10, builtin_val_stories=9),
                                                      "train")  # the val size does not touch train
    assert source_key(builtin, "train") != source_key(DataConfig(builtin_train_stories=0), "train")
    hub = DataConfig(source="tinystories", hub_train_stories=5)
    assert "hub" in source_key(hub) and source_key(hub) != source_key(DataConfig(source="tinystories"))
