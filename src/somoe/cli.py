"""The ``somoe`` command line: the parser of every verb in ``somoe.commands``, and exit codes for errors.

Every error a user can cause ends as one line on stderr, ``error: ...`` naming the input and the fix,
with exit code 2 (3: training diverged; 130/143: stopped by SIGINT/SIGTERM). :func:`main` is the one
place that maps exceptions to that line: somoe's own ``ConfigError``/``CheckpointError``, and an
``OSError`` or a JSON/YAML/UTF-8 parse error that escaped a verb. Anything else is a bug and keeps its
traceback; ``SOMOE_DEBUG=1`` shows the traceback of the mapped errors too. When a verb fails, the
output folders it created (see ``commands/_outputs.py``) are removed unless they hold a checkpoint.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import sys

from .config import ConfigError

# what a failed file operation means, in the user's words, and what to do about it
_OS_FIXES = {
    errno.ENOENT: ("does not exist", "check the path"),
    errno.ENOTDIR: ("has a file where a folder is expected", "choose a path whose parents are folders"),
    errno.EISDIR: ("is a folder, not a file", "pass a file"),
    errno.EEXIST: ("already exists", "choose another path"),
    errno.EACCES: ("is not writable", "choose a folder you can write to"),
    errno.EPERM: ("is not writable", "choose a folder you can write to"),
    errno.EROFS: ("is on a read-only file system", "choose a folder you can write to"),
    errno.ENOSPC: ("is on a full disk", "free some space"),
}


class Terminated(BaseException):
    """SIGTERM outside training (Trainer.fit saves and stops on it instead), like KeyboardInterrupt for SIGINT."""


def _terminate(signum, frame):
    raise Terminated


class Parser(argparse.ArgumentParser):
    """argparse with its errors as one ``error:`` line (argparse prints the usage first)."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message}; see `{self.prog} --help`\n")


def build_parser() -> argparse.ArgumentParser:
    from .commands import register_all

    parser = Parser(prog="somoe", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    register_all(sub)  # presets, params, prepare, train, eval, generate, report, quickstart, then the rest
    return parser


def describe(err: BaseException) -> str | None:
    """The one line for an error about the user's input, or None for a bug."""
    import yaml

    from .train.checkpoint import CheckpointError

    if isinstance(err, (ConfigError, CheckpointError)):
        return str(err)
    if isinstance(err, OSError):
        what, fix = _OS_FIXES.get(err.errno, (err.strerror or type(err).__name__, "check the path"))
        where = err.filename if err.filename is not None else "a file"
        return f"{where} {what} ({err.strerror}); {fix}"
    if isinstance(err, json.JSONDecodeError):
        return f"invalid JSON at line {err.lineno} column {err.colno} ({err.msg}); fix or replace the file"
    if isinstance(err, UnicodeDecodeError):
        return f"a file is not UTF-8 text (bad byte at offset {err.start}); pass a UTF-8 text file"
    if isinstance(err, yaml.YAMLError):
        return f"invalid YAML ({str(err).splitlines()[0]}); fix the syntax"
    return None


def _leaf(parser: argparse.ArgumentParser, args) -> argparse.ArgumentParser:
    """The sub-parser that parsed ``args`` (``bench KIND``'s for a bench kind)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            chosen = getattr(args, action.dest, None)
            if chosen in action.choices:
                return _leaf(action.choices[chosen], args)
    return parser


def parse(argv: list[str] | None) -> argparse.Namespace:
    """Parse ``argv``; ``key=value`` overrides may also follow the options (argparse takes a ``*``
    positional only once, so ``somoe sweep NAME --data DIR key=value`` would be refused)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        takes_overrides = any(a.dest == "overrides" and not a.option_strings for a in _leaf(parser, args)._actions)
        if not (takes_overrides and all("=" in e and not e.startswith("-") for e in extra)):
            _leaf(parser, args).error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse(argv)
    except SystemExit as done:  # --help, or a usage error already printed as its one line
        return done.code if isinstance(done.code, int) else 2
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:  # as SIGINT does: exit 143 after the cleanup below
        signal.signal(signal.SIGTERM, _terminate)
    from .commands._outputs import remove_new_outputs
    from .train.checkpoint import CheckpointError
    from .train.nonfinite import TrainingDiverged

    try:
        return args.func(args)
    except TrainingDiverged as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    except (KeyboardInterrupt, Terminated) as err:
        remove_new_outputs(args)
        print("interrupted", file=sys.stderr)
        return 143 if isinstance(err, Terminated) else 130
    except Exception as err:
        remove_new_outputs(args)
        line = describe(err)
        ours = isinstance(err, (ConfigError, CheckpointError))  # already phrased for the user, never a bug
        if line is None or (os.environ.get("SOMOE_DEBUG") == "1" and not ours):
            raise
        print(f"error: {line}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
