"""Every ``somoe`` verb against a table of bad inputs, each in its own process (see ``bad_input_table``).

Each case must exit with its code (2 unless the row says otherwise), print exactly one ``error:`` line
on stderr naming the input, print no traceback, and leave every file of the prepared tree and of its
working folder as it was (the tree is snapshotted before and after). One tiny dense run and one tiny
SoME run, trained once per session, are shared by all cases; the processes are forked from a server
that has imported somoe once (``forked_cli``), so the whole table runs in well under a minute.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import time
import typing
from pathlib import Path

import pytest

from bad_input_table import BAD_NUMBERS, FLAG_RANGES, NEGATIVE_OK, Case, out_of_range, verb_rows
from forked_cli import ForkedCli
from helpers import TINY

ROOT_NAME = "bad-input"
# the somoe under test, also for processes started in another working folder (a relative PYTHONPATH=src
# would then find an installed somoe instead)
SOMOE_SRC = os.pathsep.join([str(Path(__import__("somoe").__file__).parents[1]),
                             *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))])


# --- the prepared inputs ---------------------------------------------------------------------------
def _train(cfg_overrides: list[str], out: Path, cache: Path) -> None:
    from somoe.config import load_config
    from somoe.train.trainer import Trainer

    cfg = load_config(preset="debug", overrides=TINY + [f"data.cache_dir={cache}", *cfg_overrides])
    Trainer(cfg, out, progress=False, log=lambda m: None).fit()


def _copy_run(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    edit(dst)
    return dst


def _last_ckpt(run: Path) -> Path:
    return sorted((run / "checkpoints").glob("step-*"))[-1]


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


BINARY = bytes(range(256)) * 4
LATIN1 = "Once upon a time there was a caf\u00e9 by the sea.\n".encode("latin-1")


def prepare_inputs(root: Path) -> dict[str, Path | str]:
    import torch

    from somoe.hf.export import export_run

    torch.set_num_threads(1)
    cache = root / "cache"
    p: dict[str, Path | str] = {"cache": cache, "root": root}
    p["run"] = root / "run"
    _train(["train.max_steps=4", "train.eval_every=2"], p["run"], cache)
    p["some_run"] = root / "some run \u00e9"  # spaces and non-ASCII in a path that works
    _train(["train.max_steps=2", "train.eval_every=1", "model.ffn=some", "model.some.num_experts=8",
            "model.some.top_k=2", "model.some.d_ffn=32"], p["some_run"], cache)
    p["hf"] = root / "hf"
    export_run(p["run"], p["hf"], log=lambda m: None)

    files = root / "files"
    files.mkdir()
    p["missing"] = files / "no-such-thing"
    p["spaced_missing"] = files / "no such f\u00efle \u00fc"
    p["new_out"] = root / "work" / "new-out"
    p["adir"], p["afile"] = files / "adir", files / "afile.txt"
    p["adir"].mkdir()
    p["afile"].write_text("a file\n", encoding="utf-8")
    p["under_file"] = p["afile"] / "sub"
    # /proc refuses new entries even to root, where chmod would not stop a write
    p["unwritable"] = Path("/proc/somoe-bad-input/out")
    for name, content in [("empty", b""), ("binary", BINARY), ("latin1", LATIN1),
                          ("bad_yaml", b"model: [d_model: 64\n  train: {"), ("truncated_yaml", b"model:\n  d_model: \"6"),
                          ("list_yaml", b"- 1\n- 2\n"), ("bad_json", b"{\"model\": {not json"),
                          ("truncated_json", b"{\"version\": \"1.0\", \"model\": {\"type\": \"BPE\", \"vocab\": {")]:
        p[name] = files / f"{name}.{'yaml' if 'yaml' in name else 'txt'}"
        p[name].write_bytes(content)

    runs = root / "variants"
    runs.mkdir()
    p["run_copy"] = _copy_run(p["run"], runs / "copy", lambda r: None)
    p["run_no_weights"] = _copy_run(p["run"], runs / "no-weights",
                                    lambda r: (_last_ckpt(r) / "model.safetensors").unlink())
    p["run_truncated_weights"] = _copy_run(p["run"], runs / "truncated-weights",
                                           lambda r: _truncate(_last_ckpt(r) / "model.safetensors"))
    p["run_bad_config"] = _copy_run(p["run"], runs / "bad-config",
                                    lambda r: [(c / "config.yaml").write_bytes(b"model: [\n")
                                               for c in [r, *(r / "checkpoints").glob("step-*")]])
    p["run_bad_tokenizer"] = _copy_run(p["run"], runs / "bad-tokenizer",
                                       lambda r: [t.write_bytes(b"{\"model\": {") for t in r.rglob("tokenizer.json")])
    for name, content in [("binary", BINARY), ("latin1", LATIN1), ("torn", b"{\"kind\": \"train\", \"st"),
                          ("empty", b"")]:
        p[f"run_{name}_metrics"] = _copy_run(p["run"], runs / f"{name}-metrics",
                                             lambda r, c=content: (r / "metrics.jsonl").write_bytes(c))

    hfs = root / "hf-variants"
    hfs.mkdir()

    def hf_variant(name: str, file: str, edit) -> None:
        p[f"hf_{name}"] = _copy_run(p["hf"], hfs / name, lambda f: edit(f / file))

    hf_variant("bad_config", "config.json", lambda f: f.write_text("{\"model_type\": \"gpt2\",,}", encoding="utf-8"))
    hf_variant("truncated_config", "config.json", _truncate)
    hf_variant("binary_config", "config.json", lambda f: f.write_bytes(BINARY))
    hf_variant("latin1_config", "config.json", lambda f: f.write_bytes(b"{\"model_type\": \"gpt2\xe9\"}"))
    hf_variant("truncated_weights", "model.safetensors", _truncate)
    hf_variant("bad_tokenizer", "tokenizer.json", lambda f: f.write_text("{\"model\": [", encoding="utf-8"))
    hf_variant("truncated_tokenizer", "tokenizer.json", _truncate)
    hf_variant("bad_index", "model.safetensors.index.json", lambda f: f.write_text("{\"weight_map\": ",
                                                                                    encoding="utf-8"))

    data = root / "data-folders"
    for name, content in [("empty", b""), ("binary", BINARY), ("latin1", LATIN1)]:
        (data / name).mkdir(parents=True)
        (data / name / "train.txt").write_bytes(content)
        p[f"data_{name}"] = data / name
    p["tiny_sweep"] = root / "tiny-sweep.yaml"
    p["tiny_sweep"].write_text(
        "preset: debug\nruns:\n  a: [train.max_steps=1]\n", encoding="utf-8")
    (root / "work").mkdir()
    return p


# --- the snapshot ----------------------------------------------------------------------------------
def snapshot(root: Path) -> dict[str, tuple]:
    """Every file and folder under ``root``: (kind, size, mtime in ns) by relative path."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            out[str(path.relative_to(root))] = ("dir" if path.is_dir() else "file", 0 if path.is_dir() else st.st_size,
                                                0 if path.is_dir() else st.st_mtime_ns)
    return out


def tree_changes(before: dict, after: dict) -> list[str]:
    return ([f"new {k}" for k in sorted(after.keys() - before.keys())] +
            [f"removed {k}" for k in sorted(before.keys() - after.keys())] +
            [f"changed {k}" for k in sorted(before.keys() & after.keys()) if before[k] != after[k]])


# --- cases -----------------------------------------------------------------------------------------
def _numeric_actions():
    """(verb, flag, action) of every int/float flag of every verb, bench kinds included."""
    from somoe.cli import build_parser

    def subparsers(parser):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                return action.choices
        return {}

    for verb, parser in subparsers(build_parser()).items():
        kinds = subparsers(parser)
        for name, sub in (kinds.items() if kinds else [("", parser)]):
            for action in sub._actions:
                if action.option_strings and action.type is not None and action.nargs is None:
                    typ = action.type
                    numeric = typ in (int, float) or hasattr(typ, "lo")
                    if numeric:
                        yield f"{verb} {name}".strip(), action.option_strings[-1], action


def numeric_flag_cases() -> list[Case]:
    """Each numeric flag with the values just outside its range: parsed before any file is read."""
    runs = {"adapt": ["{some_run}"], "analyze": ["{some_run}"], "eval": ["{run}"], "generate": ["{run}"],
            "export": ["{run}", "{new_out}"], "upcycle": ["{run}", "--out", "{new_out}"]}
    cases = []
    for verb, flag, _ in _numeric_actions():
        key = f"{verb} {flag}"
        if key not in FLAG_RANGES:
            continue  # test_every_numeric_flag_has_a_range reports it
        for value in out_of_range(*FLAG_RANGES[key]):
            argv = [*verb.split(), *runs.get(verb, []), f"{flag}={value}"]
            cases.append(Case(verb, f"{flag} out of range ({value})", tuple(argv), names=(flag,)))
    return cases


def _numeric_keys(cls, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _numeric_keys(tp, f"{prefix}{f.name}.")
        elif tp in (int, float):
            yield f"{prefix}{f.name}", tp


def override_cases() -> list[Case]:
    """Every numeric config key with a negative, NaN, huge and zero value (``somoe params``).
    NaN is always refused, a negative value unless the key documents a negative sentinel;
    zero and huge values must be refused in one line or accepted."""
    from somoe.config import RunConfig

    cases = []
    for key, tp in _numeric_keys(RunConfig):
        for value in BAD_NUMBERS:
            must_fail = value == "nan" or (value == "-1" and key not in NEGATIVE_OK)
            cases.append(Case("params", f"override {key}={value}", ("params", "--preset", "debug", f"{key}={value}"),
                              names=(key,), code=2 if must_fail else -1))
    return cases


ALL_CASES = verb_rows() + numeric_flag_cases() + override_cases()


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp(ROOT_NAME)
    inputs = prepare_inputs(root)
    env = {"SOMOE_CACHE": str(root / "cache"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "MPLCONFIGDIR": str(tmp_path_factory.mktemp("mpl")), "PYTHONWARNINGS": "ignore"}
    cli = ForkedCli({**env, "PYTHONPATH": SOMOE_SRC})
    yield root, inputs, cli
    cli.close()


def _fill(arg: str, inputs: dict) -> str:
    return arg.format(**{k: str(v) for k, v in inputs.items()})


def check_case(case: Case, root: Path, inputs: dict, cli: ForkedCli) -> list[str]:
    """What is wrong with ``case``'s answer (empty: nothing)."""
    argv = [_fill(a, inputs) for a in case.argv]
    before = snapshot(root)
    result = cli.run(argv, cwd=root / "work")
    problems = []
    errors = [line for line in result.err.splitlines() if "error:" in line]
    if "Traceback" in result.err:
        problems.append(f"traceback: {result.err.strip().splitlines()[-1]}")
    if case.code == -1:  # accepted or refused, but cleanly
        if result.code not in (0, 2):
            problems.append(f"exit {result.code}, expected 0 or 2")
        if result.code == 2 and not (len(errors) == 1 and result.err.startswith("error:")):
            problems.append(f"expected one error line, got {result.err.strip()!r}")
    else:
        if result.code != case.code:
            problems.append(f"exit {result.code}, expected {case.code}")
        stderr_lines = [line for line in result.err.splitlines() if line.strip()]
        if not (len(errors) == 1 and stderr_lines and stderr_lines[-1].startswith("error:")
                and sum(1 for line in stderr_lines if line.startswith("error:")) == 1):
            problems.append(f"expected exactly one 'error:' line, got {result.err.strip()[-300:]!r}")
        elif case.code == 2:
            line = errors[0]
            for name in case.names:
                shown = Path(_fill(name, inputs)).name if name.startswith("{") else name
                if shown not in line:
                    problems.append(f"error line does not name {shown!r}: {line!r}")
    changes = tree_changes(before, snapshot(root))
    if changes:
        problems.append(f"files changed: {changes[:5]}")
        _restore(root, before, inputs)
    return problems


def _restore(root: Path, before: dict, inputs: dict) -> None:
    """Remove what a failing case left, so that the next cases start from the prepared tree."""
    after = snapshot(root)
    for rel in sorted(after.keys() - before.keys(), key=len, reverse=True):
        path = root / rel
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists():
            path.unlink()


def test_bad_inputs(bench):
    """All the cases in one test: the session's run and server are shared, and the report lists every
    failing case at once (with its id) rather than stopping at the first."""
    root, inputs, cli = bench
    failures, seconds = [], {}
    for case in ALL_CASES:
        start = time.perf_counter()
        problems = check_case(case, root, inputs, cli)
        seconds[case.id] = time.perf_counter() - start
        if problems:
            failures.append(f"{case.id}: {'; '.join(problems)}")
    slowest = sorted(seconds.items(), key=lambda kv: -kv[1])[:8]
    by_verb: dict[str, float] = {}
    for case in ALL_CASES:
        by_verb[case.verb] = by_verb.get(case.verb, 0.0) + seconds[case.id]
    print(f"{len(ALL_CASES)} cases in {sum(seconds.values()):.1f} s, {len(failures)} failed; slowest: "
          + ", ".join(f"{k} {v:.2f} s" for k, v in slowest) + "; by verb: "
          + ", ".join(f"{k} {v:.1f} s" for k, v in sorted(by_verb.items(), key=lambda kv: -kv[1])))
    assert not failures, f"{len(failures)} of {len(ALL_CASES)} cases failed:\n" + "\n".join(failures)


# --- coverage of the table --------------------------------------------------------------------------
def _listed_verbs() -> list[str]:
    """The verbs `somoe --help` lists, and each bench kind as `bench KIND`."""
    from somoe.cli import build_parser

    verbs = []
    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            for verb, parser in action.choices.items():
                kinds = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
                verbs += [f"{verb} {k}" for k in kinds[0].choices] if kinds else [verb]
    return verbs


def test_every_verb_has_rows():
    covered = {case.verb for case in verb_rows()}
    missing = [verb for verb in _listed_verbs() if verb not in covered]
    assert not missing, f"verbs without rows in tests/bad_input_table.py: {missing}"
    assert len(_listed_verbs()) == 23  # 16 verbs + bench's 7 kinds: a new verb must join the table


def test_every_numeric_flag_has_a_range():
    found = {f"{verb} {flag}" for verb, flag, _ in _numeric_actions()}
    assert not found - FLAG_RANGES.keys(), f"numeric flags without a range in FLAG_RANGES: {found - FLAG_RANGES.keys()}"
    assert not FLAG_RANGES.keys() - found, f"ranges of flags that no longer exist: {FLAG_RANGES.keys() - found}"


def test_a_forked_case_matches_a_plain_process(bench, tmp_path):
    """The forked children answer as ``python -m somoe`` does (exit code, stderr)."""
    root, inputs, cli = bench
    for argv in (["import-hf", str(inputs["hf_bad_config"]), "--out", str(tmp_path / "x")],
                 ["generate", str(inputs["run"]), "--top-k=-1"]):
        forked = cli.run(argv, cwd=tmp_path)
        plain = subprocess.run([sys.executable, "-m", "somoe", *argv], cwd=tmp_path, capture_output=True,
                               text=True, env={**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": SOMOE_SRC})
        assert (forked.code, forked.err) == (plain.returncode, plain.stderr)
