"""Sub-commands beyond the core ones in ``somoe.cli``, one module each.

A module here defines ``register(sub)``, which adds its parser(s) to the ``somoe``
sub-parser action and sets ``func``. ``cli.build_parser`` discovers the modules, so
adding a command never edits ``cli.py``. Import heavy dependencies inside the command
functions: every ``somoe`` invocation imports all of these modules.
"""

from __future__ import annotations

import importlib
import pkgutil


def register_all(sub) -> None:
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        module.register(sub)
