"""Run ``somoe`` verbs as separate processes, fast: a server imports somoe once, then forks per command.

A fresh ``python -m somoe`` spends about two seconds importing torch before it reads its first
argument; a table of a few hundred bad inputs would take minutes. The server (this file run as a
script) imports the CLI and its heavy dependencies once and never runs a tensor op, then forks one
child per request. Each child is a real process with its own working directory, environment,
stdout and stderr files and exit status, and ends the way the interpreter ends ``python -m somoe``:
``sys.exit(main())``, with an uncaught exception printed as a traceback and exit code 1.
``test_bad_input.py`` checks that a forked child and a plain ``python -m somoe`` give the same result.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

CASE_TIMEOUT_S = int(os.environ.get("SOMOE_CASE_TIMEOUT", "60"))  # a bad input must fail fast; a child still running after this is killed (SIGALRM)


@dataclass
class Result:
    code: int
    out: str
    err: str


class ForkedCli:
    """``run(argv, cwd, env)`` -> Result, each command in its own forked process."""

    def __init__(self, env: dict[str, str] | None = None):
        self.proc = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env={**os.environ, **(env or {})})
        assert self.proc.stdout.readline().strip() == "ready"
        self.scratch = Path(tempfile.mkdtemp(prefix="somoe-forked-"))

    def run(self, argv: list[str], cwd: Path, env: dict[str, str] | None = None) -> Result:
        out, err = self.scratch / "out", self.scratch / "err"
        request = {"argv": [str(a) for a in argv], "cwd": str(cwd), "env": env or {}, "out": str(out),
                   "err": str(err)}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        code = json.loads(self.proc.stdout.readline())["code"]
        return Result(code, out.read_text(encoding="utf-8", errors="replace"),
                      err.read_text(encoding="utf-8", errors="replace"))

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)
        for f in self.scratch.iterdir():
            f.unlink()
        self.scratch.rmdir()


def _child(request: dict) -> None:
    """In the forked child: become ``somoe ARGV`` and exit with its status (never returns)."""
    import signal
    import traceback

    code = 1
    try:
        signal.alarm(CASE_TIMEOUT_S)
        os.chdir(request["cwd"])
        os.environ.update(request["env"])
        for fd, name in ((1, "out"), (2, "err")):
            os.dup2(os.open(request[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), fd)
        sys.argv = ["somoe", *request["argv"]]
        from somoe.cli import main

        try:
            code = main(request["argv"])
        except SystemExit as exc:  # what the interpreter does with sys.exit(x)
            if exc.code is None or isinstance(exc.code, int):
                code = exc.code or 0
            else:
                print(exc.code, file=sys.stderr)
                code = 1
        except BaseException:  # noqa: BLE001 - an uncaught exception: the interpreter's traceback, exit 1
            traceback.print_exc()
            code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code if isinstance(code, int) else 1)


def serve() -> None:
    # what the verbs import lazily, imported once here (no tensor op runs in this process: forking
    # after one could copy a thread pool's locks into the children)
    import somoe.cli
    import somoe.evaluate.runs  # noqa: F401
    import somoe.hf.export  # noqa: F401
    import somoe.train.trainer  # noqa: F401

    somoe.cli.build_parser()
    print("ready", flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            _child(request)
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        print(json.dumps({"code": code}), flush=True)


if __name__ == "__main__":
    serve()
