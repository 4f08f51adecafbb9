"""``somoe report RUN``: rebuild a run's summary.txt and metrics.png from its metrics.jsonl."""

from __future__ import annotations

from pathlib import Path


def cmd_report(args) -> int:
    from ..report.summary import write_report

    print(write_report(Path(args.run)), end="")
    return 0


def register(sub) -> None:
    p = sub.add_parser("report", help="rebuild summary.txt and metrics.png from metrics.jsonl")
    p.add_argument("run")
    p.set_defaults(func=cmd_report)
