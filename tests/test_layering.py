"""The import rule of docs/architecture.md, read from the source with ``ast``: imports flow down.

Lower layers (config, data, models, metrics, train) import nothing from the workflows above them
(evaluate, generate, analysis, report, experiments, bench, hf), and nothing below the command line
imports ``somoe.commands`` or ``somoe.cli``. Imports inside functions count too: a lazy upward import
is still an upward dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

LOWER, UPPER, TOP = 0, 1, 2
LAYER = {
    "config": LOWER, "data": LOWER, "presets": LOWER, "models": LOWER, "metrics": LOWER, "train": LOWER,
    "evaluate": UPPER, "generate": UPPER, "analysis": UPPER, "report": UPPER, "experiments": UPPER,
    "bench": UPPER, "hf": UPPER,
    "commands": TOP, "cli": TOP, "__main__": TOP,
}
LAYER_NAME = {LOWER: "lower", UPPER: "upper", TOP: "command line"}


def module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, src: Path) -> set[str]:
    """Absolute names of every module ``path`` imports, at any depth of its code (lazy imports too)."""
    name = module_name(path, src)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.add(base)
            if node.module is None:  # ``from . import x``: x may be a module of that package
                found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def component(module: str, root: str) -> str | None:
    """``somoe.models.ffn.some`` -> ``models``; None for the package root or another package."""
    parts = module.split(".")
    return parts[1] if parts[0] == root and len(parts) > 1 else None


def violations(src: Path, root: str = "somoe", layer: dict[str, int] = LAYER) -> list[str]:
    """Every broken rule in the package ``src/root``, one line each."""
    problems = []
    for path in sorted((src / root).rglob("*.py")):
        name = module_name(path, src)
        own = component(name, root)
        if own is None:
            continue  # the package's __init__: a docstring and a version
        if own not in layer:
            problems.append(f"{name}: {root}.{own} belongs to no layer; add it to LAYER in tests/test_layering.py")
            continue
        for target in sorted(imported_modules(path, src)):
            other = component(target, root)
            if other is None or other == own or other not in layer:
                continue
            if layer[other] > layer[own]:
                problems.append(f"{name} ({LAYER_NAME[layer[own]]}) imports {target} ({LAYER_NAME[layer[other]]})")
            elif other == "commands" and own != "cli":
                problems.append(f"{name} imports {target}: only somoe.cli imports the commands")
    return problems


def test_no_module_imports_upward():
    assert violations(SRC) == []


def test_the_scan_sees_the_real_graph():
    """The rule test above would pass on an empty scan: check it reads the edges we know exist."""
    src = SRC
    pkg = src / "somoe"
    assert len(list(pkg.rglob("*.py"))) > 50
    assert "somoe.metrics" in imported_modules(pkg / "train" / "trainer.py", src)  # top-level relative import
    assert "somoe.train.trainer" in imported_modules(pkg / "commands" / "train.py", src)  # inside a function
    assert "somoe.commands" in imported_modules(pkg / "cli.py", src)
    assert "somoe.models.ffn.usage" in imported_modules(pkg / "models" / "ffn" / "routing_tally.py", src)


@pytest.mark.parametrize("source, expected", [
    ("def f():\n    from ..evaluate.runs import load_run\n", "somoe.models.bad (lower) imports somoe.evaluate.runs (upper)"),
    ("import somoe.experiments.quickstart\n", "somoe.models.bad (lower) imports somoe.experiments.quickstart (upper)"),
    ("from .. import cli\n", "somoe.models.bad (lower) imports somoe.cli (command line)"),
])
def test_an_upward_import_is_reported(tmp_path, source, expected):
    pkg = tmp_path / "somoe"
    (pkg / "models").mkdir(parents=True)
    (pkg / "evaluate").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "models" / "__init__.py").write_text("from ..config import x\n")  # downward: fine
    (pkg / "evaluate" / "runs.py").write_text("from ..models import y\n")
    (pkg / "models" / "bad.py").write_text(source)
    assert violations(tmp_path) == [expected]


def test_commands_are_imported_only_by_the_cli(tmp_path):
    pkg = tmp_path / "somoe"
    (pkg / "experiments").mkdir(parents=True)
    (pkg / "experiments" / "job.py").write_text("def f():\n    from ..commands.train import cmd_train\n")
    (pkg / "__main__.py").write_text("from .commands.train import cmd_train\n")
    (pkg / "cli.py").write_text("from .commands import register_all\n")
    assert violations(tmp_path) == [
        "somoe.__main__ imports somoe.commands.train: only somoe.cli imports the commands",
        "somoe.experiments.job (upper) imports somoe.commands.train (command line)",
    ]


def test_a_new_top_level_module_must_be_given_a_layer(tmp_path):
    (tmp_path / "somoe").mkdir()
    (tmp_path / "somoe" / "loose.py").write_text("")
    assert violations(tmp_path) == ["somoe.loose: somoe.loose belongs to no layer; add it to LAYER in "
                                    "tests/test_layering.py"]
