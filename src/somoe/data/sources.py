"""Where stories come from: local files, the built-in TinyStories corpus, or the Hugging Face hub.

Every failure a user can fix (missing file, bad encoding, unknown format, no
network) raises :class:`~somoe.config.ConfigError` with a one-line message
that names the problem and the fix.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Literal

from ..config import ConfigError, DataConfig
from .packaged import CORPUS_VERSION, FILES, read_packaged_text

EOT = "<|endoftext|>"
SUPPORTED = (".txt", ".jsonl", ".parquet")
Split = Literal["train", "val"]


# --- single files ------------------------------------------------------------------------
def _check_is_file(path: Path) -> None:
    if path.is_dir():
        raise ConfigError(f"{path} is a directory, not a story file; pass a file inside it (e.g. {path}/train.txt), "
                          f"or the folder as quickstart's --data DIR")
    if not path.is_file():
        raise ConfigError(f"story file {path} not found; check the path (data.train_path / data.val_path / --data)")


def _decode_utf8(raw: bytes, path: Path) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not valid UTF-8 (bad byte at offset {e.start}); re-encode it as UTF-8, "
                          f"e.g. iconv -f latin1 -t utf-8 {path.name} > fixed.txt") from None
    if "\x00" in text:  # valid UTF-8 but a NUL byte: an archive, an image, a token dump... never story text
        raise ConfigError(f"{path} looks binary (NUL byte at offset {text.index(chr(0))}), not text; "
                          f"point it at a UTF-8 text file of stories")
    return text


def _clean(stories) -> list[str]:
    # strip and drop empties; "\r\n" from Windows editors would otherwise become part of the text
    out = []
    for story in stories:
        story = story.replace("\r\n", "\n").strip()
        if story:
            out.append(story)
    return out


def _split_txt(text: str) -> list[str]:
    # stories are separated by a line "<|endoftext|>"; splitting on the marker wherever it is
    # also handles files where it ends the last line of a story (it never belongs to the text)
    return _clean(text.split(EOT))


def _read_txt(path: Path) -> list[str]:
    return _split_txt(_decode_utf8(path.read_bytes(), path))


def _read_jsonl(path: Path) -> list[str]:
    text = _decode_utf8(path.read_bytes(), path)
    stories = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} line {n} is not valid JSON ({e.msg}); write one JSON object per line") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ConfigError(f'{path} line {n} has no string "text" field; write one {{"text": "..."}} '
                              f"object per line")
        stories.append(record["text"])
    return _clean(stories)


def _read_parquet(path: Path) -> list[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError(f"reading {path.name} needs pyarrow: pip install somoe[parquet] "
                          f"(or convert the file to .jsonl)") from None
    try:
        table = pq.read_table(path, columns=["text"])
    except (KeyError, ValueError) as e:  # pyarrow reports a missing column as one of these
        raise ConfigError(f"{path} has no 'text' column ({str(e).splitlines()[0]}); "
                          f"store the stories in a string column named text") from None
    return _clean(s for s in table.column("text").to_pylist() if isinstance(s, str))


def read_story_file(path: str | Path) -> list[str]:
    """Stories of a ``.txt`` (``<|endoftext|>`` separated), ``.jsonl`` (``text`` field) or
    ``.parquet`` (``text`` column) file, each stripped, empty ones dropped."""
    path = Path(path).expanduser()
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED and not path.is_dir():
        raise ConfigError(f"{path}: unknown story file type '{suffix}'; use one of {', '.join(SUPPORTED)}")
    _check_is_file(path)
    reader = {".txt": _read_txt, ".jsonl": _read_jsonl, ".parquet": _read_parquet}[suffix]
    stories = reader(path)
    if not stories:
        layout = f"stories separated by a line {EOT}" if suffix == ".txt" else "non-empty text records"
        raise ConfigError(f"{path} holds no stories (empty file?); point it at a file with {layout}")
    return stories


# --- resolving data.source ------------------------------------------------------------------
def resolve_source(data_cfg: DataConfig) -> str:
    """``data.source`` with ``auto`` resolved: files if ``train_path`` is set, else builtin."""
    if data_cfg.source == "auto":
        return "files" if data_cfg.train_path else "builtin"
    if data_cfg.source == "files" and not data_cfg.train_path:
        raise ConfigError("data.source=files needs data.train_path=FILE (.txt/.jsonl/.parquet)")
    if data_cfg.source not in ("builtin", "files", "tinystories"):
        raise ConfigError(f"unknown data.source={data_cfg.source!r}; use auto, builtin, files or tinystories")
    return data_cfg.source


def _n_val_split(n: int, fraction: float, path: str) -> int:
    if n < 2:
        raise ConfigError(f"{path} has only {n} story; set data.val_path=FILE or add stories "
                          f"(a validation split needs at least one story besides training)")
    return min(n - 1, max(1, round(n * fraction)))


def _load_files(data_cfg: DataConfig, split: Split) -> list[str]:
    if data_cfg.val_path:
        return read_story_file(data_cfg.train_path if split == "train" else data_cfg.val_path)
    # no val file: hold out the LAST val_fraction of the training file (deterministic, no shuffling)
    stories = read_story_file(data_cfg.train_path)
    n_val = _n_val_split(len(stories), data_cfg.val_fraction, data_cfg.train_path)
    return stories[:-n_val] if split == "train" else stories[-n_val:]


def builtin_stories(split: Split, limit: int = 0) -> list[str]:
    """The shipped TinyStories ``train`` or ``val`` (dev.txt) stories, in file order; the first ``limit`` if > 0."""
    stories = _split_txt(read_packaged_text(FILES[split]))
    return stories[:limit] if limit > 0 else stories


def _load_builtin(data_cfg: DataConfig, split: Split) -> list[str]:
    # the shipped train.txt and dev.txt (disjoint), optionally only their first N stories
    limit = data_cfg.builtin_train_stories if split == "train" else data_cfg.builtin_val_stories
    return builtin_stories(split, limit)


def _load_hub(data_cfg: DataConfig, split: Split) -> list[str]:
    try:
        from datasets import load_dataset
    except ImportError:
        raise ConfigError("data.source=tinystories needs the datasets package: pip install somoe[hub] "
                          "(or use data.source=builtin / data.train_path=FILE)") from None
    hub_split, count = ("train", data_cfg.hub_train_stories) if split == "train" else \
        ("validation", data_cfg.hub_val_stories)
    try:
        # streaming reads only the first `count` rows instead of downloading the whole split
        rows = load_dataset(data_cfg.hub_dataset, split=hub_split, streaming=True)
        stories = _clean(row["text"] for row in itertools.islice(rows, count))
    except Exception as e:  # offline, unknown dataset name, hub errors: all surface as one fix
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"cannot load {data_cfg.hub_dataset} ({hub_split}) from the Hugging Face hub ({msg}); "
                          f"offline, use data.source=builtin or data.train_path=FILE") from None
    if not stories:
        raise ConfigError(f"{data_cfg.hub_dataset} ({hub_split}) returned no stories; check data.hub_dataset")
    return stories


def load_stories(data_cfg: DataConfig, split: Split) -> list[str]:
    """The ``train`` or ``val`` stories that ``data_cfg`` describes (see ``DataConfig.source``)."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    source = resolve_source(data_cfg)
    loader = {"files": _load_files, "builtin": _load_builtin, "tinystories": _load_hub}[source]
    return loader(data_cfg, split)


# --- cache identity ------------------------------------------------------------------------------
def _file_id(path: str) -> str:
    p = Path(path).expanduser().resolve()
    _check_is_file(p)
    st = p.stat()
    return f"{p}:{st.st_size}:{st.st_mtime_ns}"


def source_key(data_cfg: DataConfig, split: Split | None = None) -> str:
    """A string that changes whenever the stories of ``split`` (both splits if None) may change.

    Files: absolute path, size and mtime (an edited file invalidates the cache).
    Builtin: corpus version and story counts. Hub: dataset name and counts.
    """
    source = resolve_source(data_cfg)
    if source == "files":
        if data_cfg.val_path:
            parts = {"train": _file_id(data_cfg.train_path), "val": _file_id(data_cfg.val_path)}
            return f"files|{parts[split]}" if split else f"files|{parts['train']}|{parts['val']}"
        # both splits come from the one file; the cut point depends on val_fraction
        return f"files|{_file_id(data_cfg.train_path)}|val_fraction={data_cfg.val_fraction!r}"
    if source == "builtin":
        counts = {"train": f"train={data_cfg.builtin_train_stories}", "val": f"dev={data_cfg.builtin_val_stories}"}
        span = counts[split] if split else f"{counts['train']}|{counts['val']}"
        return f"builtin|{CORPUS_VERSION}|{span}"
    counts = {"train": f"train={data_cfg.hub_train_stories}", "val": f"validation={data_cfg.hub_val_stories}"}
    span = counts[split] if split else f"{counts['train']}|{counts['val']}"
    return f"hub|{data_cfg.hub_dataset}|{span}"
