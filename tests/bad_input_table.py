"""The bad-input table: for every ``somoe`` verb, the inputs a user gets wrong and the answer each must get.

A row is a command line with placeholders (``{run}``, ``{missing}`` ...) that ``test_bad_input.py``
fills with the paths of its prepared inputs (see ``INPUTS`` there). Unless a row says otherwise the
answer is exit code 2, exactly one line on stderr starting with ``error:`` that contains each of
``names`` (a path is matched by its last component), no traceback, and no file created, changed
or removed anywhere under the prepared tree or the working folder.

Numeric flags get their rows from the parser (every int/float flag declares its range, see
``somoe.commands._numbers``) and numeric config keys from the config dataclasses, so a new flag or
key is covered without editing this file. A new verb needs rows here: ``test_every_verb_has_rows``
fails otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Case:
    verb: str  # as `somoe --help` lists it; "bench layer" for a bench kind
    what: str  # the kind of bad input, as docs/reliability.md groups them
    argv: tuple[str, ...]
    names: tuple[str, ...] = ()  # each must appear in the error line (paths: their last component)
    code: int = 2

    @property
    def id(self) -> str:
        return f"{self.verb}: {self.what}"


def C(verb: str, what: str, *argv: str, names=(), code: int = 2) -> Case:
    return Case(verb, what, tuple(argv), tuple(names) if not isinstance(names, str) else (names,), code)


TINY_OVERRIDES = ("--preset", "debug", "model.vocab_size=320", "data.builtin_train_stories=60",
                  "data.builtin_val_stories=10", "data.tokenizer_train_stories=60", "data.cache_dir={cache}")

# story-file inputs that every path to a text file gets
TEXT_INPUTS = [("missing path", "{missing}"), ("empty file", "{empty}"), ("folder where a file is expected", "{adir}"),
               ("binary file", "{binary}"), ("non-UTF-8 text", "{latin1}"), ("parent is a file", "{under_file}"),
               ("path with spaces and non-ASCII, missing", "{spaced_missing}")]
# run-folder inputs that every verb reading a run gets
RUN_INPUTS = [("missing run", "{missing}"), ("file where a run folder is expected", "{afile}"),
              ("empty folder", "{adir}"), ("parent is a file", "{under_file}"),
              ("truncated safetensors", "{run_truncated_weights}"), ("checkpoint removed mid-way", "{run_no_weights}"),
              ("corrupt config.yaml", "{run_bad_config}"), ("corrupt tokenizer.json", "{run_bad_tokenizer}"),
              ("path with spaces and non-ASCII, missing", "{spaced_missing}")]
# output folders: where a verb writes
OUT_INPUTS = [("output is an existing file", "{afile}"), ("output's parent is a file", "{under_file}"),
              ("output in an unwritable folder", "{unwritable}")]


def _text_rows(verb: str, prefix: tuple[str, ...], flag: str | None, suffix: tuple[str, ...] = ()) -> list[Case]:
    rows = []
    for what, path in TEXT_INPUTS:
        argv = (*prefix, flag, path, *suffix) if flag else (*prefix, path, *suffix)
        rows.append(C(verb, f"{flag or 'input'}: {what}", *argv, names=path))
    return rows


def _run_rows(verb: str, suffix: tuple[str, ...] = (), before: tuple[str, ...] = ()) -> list[Case]:
    return [C(verb, f"RUN: {what}", *before, path, *suffix, names=path) for what, path in RUN_INPUTS]


def _out_rows(verb: str, argv: tuple[str, ...], flag: str | None = "--out", after: tuple[str, ...] = ()) -> list[Case]:
    rows = []
    for what, path in OUT_INPUTS:
        out = (flag, path) if flag else (path,)
        rows.append(C(verb, f"{flag or 'OUT'}: {what}", *argv, *out, *after, names=path))
    return rows


def _config_rows(verb: str, prefix: tuple[str, ...], suffix: tuple[str, ...] = ()) -> list[Case]:
    files = [("missing path", "{missing}"), ("empty file", "{empty}"), ("folder where a file is expected", "{adir}"),
             ("binary file", "{binary}"), ("non-UTF-8 text", "{latin1}"), ("corrupt YAML", "{bad_yaml}"),
             ("truncated YAML", "{truncated_yaml}"), ("YAML that is not a mapping", "{list_yaml}"),
             ("parent is a file", "{under_file}")]
    return [C(verb, f"--config: {what}", *prefix, "--config", path, *suffix, names=path) for what, path in files]


def _data_override_rows(verb: str, prefix: tuple[str, ...], suffix: tuple[str, ...] = ()) -> list[Case]:
    rows = []
    for what, path in TEXT_INPUTS:
        rows.append(C(verb, f"data.train_path: {what}", *prefix, *TINY_OVERRIDES, f"data.train_path={path}", *suffix,
                      names=path))
    for what, path in [("missing path", "{missing}"), ("corrupt tokenizer.json", "{bad_json}"),
                       ("truncated tokenizer.json", "{truncated_json}"), ("binary file", "{binary}"),
                       ("folder where a file is expected", "{adir}")]:
        rows.append(C(verb, f"data.tokenizer_path: {what}", *prefix, *TINY_OVERRIDES, f"data.tokenizer_path={path}",
                      *suffix, names=path))
    return rows


def verb_rows() -> list[Case]:
    rows: list[Case] = [
        C("presets", "an argument it does not take", "presets", "extra", names="extra"),
        C("params", "unknown preset", "params", "--preset", "no_such_preset", names="no_such_preset"),
        C("params", "override without '='", "params", "--preset", "debug", "model.d_model", names="model.d_model"),
        C("params", "unknown key", "params", "--preset", "debug", "model.d_modle=3", names="model.d_modle"),
    ]
    rows += _config_rows("params", ("params",))

    # prepare and train: config files, output folders, story files and tokenizers named by overrides
    for verb in ("prepare", "train"):
        extra = ("--no-progress",) if verb == "train" else ()
        rows += _config_rows(verb, (verb, *extra))
        rows += _out_rows(verb, (verb, *extra, *TINY_OVERRIDES))
        rows += _data_override_rows(verb, (verb, *extra, "--out", "{new_out}"))
    rows += [
        C("train", "--resume: missing checkpoint", "train", "--no-progress", *TINY_OVERRIDES, "--out", "{new_out}",
          "--resume", "{missing}", names="{missing}"),
        C("train", "--resume: a file", "train", "--no-progress", *TINY_OVERRIDES, "--out", "{new_out}", "--resume",
          "{afile}", names="{afile}"),
        C("train", "--out: a run with checkpoints, no --resume", "train", "--no-progress", *TINY_OVERRIDES,
          "--out", "{run_copy}", names="{run_copy}"),
    ]

    # verbs that read a run
    rows += _run_rows("eval", ("--device", "cpu"), ("eval",))
    rows += _text_rows("eval", ("eval", "{run}", "--device", "cpu"), "--data")
    rows += _run_rows("generate", ("--device", "cpu", "--max-new-tokens", "2"), ("generate",))
    rows += [C("report", f"RUN: {what}", "report", path, names=path) for what, path in
             [("missing run", "{missing}"), ("file where a run folder is expected", "{afile}"),
              ("empty folder", "{adir}"), ("parent is a file", "{under_file}"),
              ("binary metrics.jsonl", "{run_binary_metrics}"), ("non-UTF-8 metrics.jsonl", "{run_latin1_metrics}"),
              ("truncated metrics.jsonl (no complete record)", "{run_torn_metrics}"),
              ("empty metrics.jsonl", "{run_empty_metrics}")]]
    rows += _run_rows("upcycle", ("--out", "{new_out}", "--device", "cpu"), ("upcycle",))
    rows += [
        C("upcycle", "RUN: another FFN kind (SoME)", "upcycle", "{some_run}", "--out", "{new_out}", "--device", "cpu",
          names="{some_run}"),
        C("upcycle", "--out: a run with checkpoints", "upcycle", "{run}", "--out", "{run_copy}", "--device", "cpu",
          names="{run_copy}"),
    ]
    rows += _out_rows("upcycle", ("upcycle", "{run}", "--device", "cpu"))
    rows += _run_rows("adapt", ("--device", "cpu", "--pre-batches", "1", "--shift-batches", "1",
                                "--heldout-batches", "1"), ("adapt",))
    rows += [C("adapt", "RUN: another FFN kind (dense)", "adapt", "{run}", "--device", "cpu", names="{run}")]
    rows += _text_rows("adapt", ("adapt", "{some_run}", "--device", "cpu", "--pre-batches", "1",
                                 "--shift-batches", "1", "--heldout-batches", "1"), "--shift-data")
    rows += _text_rows("adapt", ("adapt", "{some_run}", "--device", "cpu", "--pre-batches", "1",
                                 "--shift-batches", "1", "--heldout-batches", "1"), "--in-data")
    rows += _out_rows("adapt", ("adapt", "{some_run}", "--device", "cpu", "--pre-batches", "1",
                                "--shift-batches", "1", "--heldout-batches", "1", "--shift-data", "{missing}"))
    rows += _run_rows("analyze", ("--device", "cpu", "--sample-batches", "1"), ("analyze",))
    rows += [
        C("analyze", "--checkpoints: not steps", "analyze", "{some_run}", "--checkpoints", "abc", names="abc"),
        C("analyze", "--checkpoints: a step with no checkpoint", "analyze", "{some_run}", "--checkpoints", "999",
          names="999"),
    ]
    rows += _text_rows("analyze", ("analyze", "{some_run}", "--device", "cpu", "--sample-batches", "1"), "--data")
    rows += _out_rows("analyze", ("analyze", "{some_run}", "--checkpoints", "abc"))
    rows += [C("compare", f"RUN: {what}", "compare", "{run}", path, "--out", "{new_out}", names=path) for what, path in
             [("missing run", "{missing}"), ("file where a run folder is expected", "{afile}"),
              ("empty folder", "{adir}"), ("parent is a file", "{under_file}"),
              ("binary metrics.jsonl", "{run_binary_metrics}"), ("non-UTF-8 metrics.jsonl", "{run_latin1_metrics}"),
              ("path with spaces and non-ASCII, missing", "{spaced_missing}")]]
    rows += _out_rows("compare", ("compare", "{run}"))

    # export / import-hf (the three first found by hand are rows here)
    rows += _run_rows("export", ("{new_out}",), ("export",))
    rows += [C("export", "--step: no such checkpoint", "export", "{run}", "{new_out}", "--step", "999", names="999")]
    rows += _out_rows("export", ("export", "{run}"), flag=None)
    hf = [("missing folder", "{missing}"), ("file where a folder is expected", "{afile}"), ("empty folder", "{adir}"),
          ("parent is a file", "{under_file}"), ("config.json is not valid JSON", "{hf_bad_config}"),
          ("config.json truncated", "{hf_truncated_config}"), ("config.json is binary", "{hf_binary_config}"),
          ("config.json is not UTF-8", "{hf_latin1_config}"),
          ("model.safetensors truncated", "{hf_truncated_weights}"),
          ("tokenizer.json is not valid JSON", "{hf_bad_tokenizer}"),
          ("tokenizer.json truncated", "{hf_truncated_tokenizer}"),
          ("model.safetensors.index.json corrupt", "{hf_bad_index}"),
          ("path with spaces and non-ASCII, missing", "{spaced_missing}")]
    rows += [C("import-hf", f"FOLDER: {what}", "import-hf", path, "--out", "{new_out}", names=path) for what, path in hf]
    rows += _out_rows("import-hf", ("import-hf", "{hf}"))
    rows += [C("import-hf", "--out: a run with checkpoints", "import-hf", "{hf}", "--out", "{run_copy}",
               names="{run_copy}")]

    # the verbs that train several runs
    rows += [C("quickstart", f"--data: {what}", "quickstart", "--data", path, "--out", "{new_out}", names=path)
             for what, path in [("missing folder", "{missing}"), ("a file", "{afile}"),
                                ("folder without train.txt", "{adir}"), ("empty train.txt", "{data_empty}"),
                                ("binary train.txt", "{data_binary}"), ("non-UTF-8 train.txt", "{data_latin1}"),
                                ("parent is a file", "{under_file}"),
                                ("path with spaces and non-ASCII, missing", "{spaced_missing}")]]
    rows += [
        C("quickstart", "--presets: unknown preset", "quickstart", "--presets", "no_such_preset", "--out", "{new_out}",
          names="no_such_preset"),
        C("quickstart", "override: unknown key", "quickstart", "--out", "{new_out}", "train.max_stepz=3",
          names="train.max_stepz"),
    ]
    rows += _out_rows("quickstart", ("quickstart", "--presets", "debug", *TINY_OVERRIDES[2:]))
    sweep_files = [("missing file", "{missing}"), ("empty file", "{empty}"), ("binary file", "{binary}"),
                   ("non-UTF-8 text", "{latin1}"), ("corrupt YAML", "{bad_yaml}"), ("truncated YAML", "{truncated_yaml}"),
                   ("YAML that is not a mapping", "{list_yaml}"), ("folder where a file is expected", "{adir}"),
                   ("parent is a file", "{under_file}")]
    rows += [C("sweep", f"SWEEP: {what}", "sweep", path, "--out", "{new_out}", names=path) for what, path in sweep_files]
    rows += [C("sweep", f"--data: {what}", "sweep", "ablation_a_cpu", "--dry-run", "--data", path, names=path)
             for what, path in [("missing folder", "{missing}"), ("a file", "{afile}"),
                                ("folder without train.txt", "{adir}")]]
    rows += [C("sweep", "no sweep named", "sweep", names="sweep --list"),
             C("sweep", "override: unknown key", "sweep", "ablation_a_cpu", "--dry-run", "train.max_stepz=3",
               names="train.max_stepz")]
    rows += _out_rows("sweep", ("sweep", "{tiny_sweep}"))
    rows += _config_rows("transition", ("transition",))
    rows += [C("transition", "neither --preset nor --config", "transition", names="--preset"),
             C("transition", "unknown preset", "transition", "--preset", "no_such_preset", names="no_such_preset")]
    rows += _out_rows("transition", ("transition", "--preset", "cpu_transition", "--no-progress",
                                     *TINY_OVERRIDES[2:], "train.max_steps=2"))

    # bench kinds: their list flags and presets (numeric flags come from the parser)
    rows += [
        C("bench layer", "--grid: not E:k pairs", "bench", "layer", "--grid", "8:x", names="8:x"),
        C("bench layer", "--dtypes: unknown", "bench", "layer", "--dtypes", "fp64", names="fp64"),
        C("bench train", "--presets: unknown preset", "bench", "train", "--quick", "--presets", "no_such_preset",
          names="no_such_preset"),
        C("bench train", "override: unknown key", "bench", "train", "--quick", "--presets", "debug", "model.d_modle=3",
          names="model.d_modle"),
        C("bench generate", "--preset: unknown preset", "bench", "generate", "--preset", "no_such_preset",
          names="no_such_preset"),
        C("bench memory", "--preset: unknown preset", "bench", "memory", "--preset", "no_such_preset",
          names="no_such_preset"),
        C("bench memory", "override: unknown key", "bench", "memory", "--preset", "debug", "model.d_modle=3",
          names="model.d_modle"),
        C("bench ops", "--paths: unknown", "bench", "ops", "--paths", "gpu", names="gpu"),
        C("bench ops", "--grid: k > E", "bench", "ops", "--grid", "4:8", names="4:8"),
        C("bench compile", "--preset: unknown preset", "bench", "compile", "--preset", "no_such_preset",
          names="no_such_preset"),
        C("bench compile", "--scope: unknown", "bench", "compile", "--scope", "nothing", names="nothing"),
        C("bench gpu", "--modes: unknown", "bench", "gpu", "--modes", "warp", names="warp"),
        C("bench gpu", "--presets: unknown preset", "bench", "gpu", "--device", "cpu", "--presets", "no_such_preset",
          names="no_such_preset"),
    ]
    return rows


# config keys whose documented range includes negative numbers (a sentinel): every other numeric key
# refuses a negative value
NEGATIVE_OK = {"train.warmup_steps": -1, "model.some.beta_final": -1}
BAD_NUMBERS = ("-1", "nan", "1e30", "0")  # negative, not a number, huge, zero

# every numeric flag's documented range: (lo, hi, integer, lo excluded). A flag of `somoe --help`
# missing here fails test_every_numeric_flag_has_a_range; its rows are the values just outside.
FLAG_RANGES = {
    "adapt --pre-batches": (1, 10**9, True, False), "adapt --shift-batches": (1, 10**9, True, False),
    "adapt --heldout-batches": (1, 10**9, True, False), "adapt --batch-size": (1, 10**9, True, False),
    "analyze --sample-batches": (1, 10**9, True, False), "analyze --clusters": (0, 10**9, True, False),
    "eval --batches": (0, 10**9, True, False), "eval --seq-len": (0, 10**9, True, False),
    "generate --max-new-tokens": (0, 10**9, True, False), "generate --temperature": (0, 1e6, False, False),
    "generate --top-k": (0, 10**9, True, False), "generate --top-p": (0, 1, False, True),
    "generate --seed": (0, 2**63 - 1, True, False),
    "export --step": (0, 10**9, True, False),
    "upcycle --experts": (1, 10**9, True, False), "upcycle --top-k": (1, 10**9, True, False),
    "upcycle --probe-sequences": (1, 10**9, True, False), "upcycle --tolerance": (0, 1e6, False, True),
    **{f"bench {kind} --reps": (1, 10**9, True, False) for kind in ("layer", "train", "generate")},
    **{f"bench {kind} --threads": (0, 4096, True, False) for kind in ("layer", "train", "generate", "compile", "gpu")},
    **{f"bench {kind} --{flag}": (1, 10**9, True, False) for kind in ("layer", "ops")
       for flag in ("tokens", "d-model", "d-ffn")},
    "bench generate --batch": (1, 10**9, True, False), "bench generate --prompt-len": (1, 10**9, True, False),
    "bench generate --new-tokens": (1, 10**9, True, False),
    "bench memory --batch": (1, 10**9, True, False), "bench memory --seq-len": (0, 10**9, True, False),
    "bench memory --budget-gib": (0, 1e6, False, True),
    "bench ops --top": (0, 10**9, True, False),
    "bench compile --steps": (2, 10**9, True, False),
    "bench gpu --steps": (1, 10**9, True, False), "bench gpu --warmup": (0, 10**9, True, False),
}


def out_of_range(lo, hi, integer: bool, low_open: bool) -> list[str]:
    """The values just outside a flag's range, a negative one, NaN and a huge one."""
    values = {"-1", "nan", str(10**30) if integer else "1e30"}
    if low_open:
        values.add(str(lo))
    else:
        values.add(str(lo - 1))
    if integer:
        values.add(str(hi + 1))
    return sorted(values)
