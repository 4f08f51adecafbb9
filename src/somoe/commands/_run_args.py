"""What the verbs share: config arguments (``--preset``/``--config`` + overrides), the run folder, ``--json`` output."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..config import RunConfig, load_config
from ._outputs import new_output


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", help="a shipped preset (see `somoe presets`)")
    p.add_argument("--config", help="a YAML config file")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.lr=4e-4")


def add_allow_change_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-config-change", action="append", default=[], metavar="KEY",
                   help="let a resume change this data.*/model.* setting (repeatable); refused otherwise, since "
                        "the checkpoints were trained with the old one")


def load_run_config(args) -> RunConfig:
    """The config the arguments name; the ``quickstart`` preset when neither --preset nor --config is given."""
    preset = args.preset if (args.preset or args.config) else "quickstart"
    return load_config(preset=preset if not args.config else None, config_file=args.config,
                       overrides=args.overrides)


def run_dir(args, cfg: RunConfig) -> Path:
    """``--out``, or runs/NAME, created; refused when it names a file (see ``_outputs.new_output``)."""
    return new_output(args, Path(args.out) if args.out else Path("runs") / cfg.name)


def print_result(args, result: dict, line: str) -> int:
    """``result`` as one JSON line with ``--json``, else the human ``line``; exit code 0."""
    print(json.dumps(result) if args.json else line)
    return 0
