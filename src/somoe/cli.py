"""The ``somoe`` command line: the parser of every verb in ``somoe.commands``, and exit codes for errors."""

from __future__ import annotations

import argparse
import sys

from .config import ConfigError


def build_parser() -> argparse.ArgumentParser:
    from .commands import register_all

    parser = argparse.ArgumentParser(prog="somoe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    register_all(sub)  # presets, params, prepare, train, eval, generate, report, quickstart, then the rest
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .train.checkpoint import CheckpointError
    from .train.nonfinite import TrainingDiverged

    try:
        return args.func(args)
    except (ConfigError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except TrainingDiverged as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
