"""Every ``somoe`` verb, one module per verb or per family of verbs.

A module here defines ``register(sub)``, which adds its parser(s) to the ``somoe``
sub-parser action and sets ``func``. ``cli.build_parser`` calls :func:`register_all`, which
discovers the modules, so adding a command never edits ``cli.py``. Modules whose name starts
with ``_`` are helpers, not commands. Import heavy dependencies inside the command
functions: every ``somoe`` invocation imports all of these modules.
"""

from __future__ import annotations

import importlib
import pkgutil

# the everyday verbs first in ``somoe --help``, in the order of a run's life; the rest alphabetically
CORE = ("configs", "train", "eval", "generate", "report", "quickstart")


def register_all(sub) -> None:
    names = [m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")]
    for name in sorted(names, key=lambda n: (CORE.index(n) if n in CORE else len(CORE), n)):
        importlib.import_module(f"{__name__}.{name}").register(sub)
