"""``somoe compare RUN [RUN ...]``: one table and overlaid val-loss curves (vs tokens, vs wall time)."""

from __future__ import annotations


def cmd_compare(args) -> int:
    from ..analysis.compare import check_runs
    from ..analysis.compare import compare_runs
    from pathlib import Path

    from ._outputs import new_output

    check_runs([Path(r) for r in args.runs])  # before the output folder is created
    out = new_output(args, args.out or "runs/compare")
    print(compare_runs(args.runs, out, title=args.title))
    print(f"wrote {out}/compare.md, compare.png, compare.json")
    return 0


def register(sub) -> None:
    p = sub.add_parser("compare", help="table and overlaid validation curves of several runs")
    p.add_argument("runs", nargs="+", help="run folders (each with metrics.jsonl)")
    p.add_argument("--out", help="output folder (default runs/compare)")
    p.add_argument("--title", default="", help="title of the report and figure")
    p.set_defaults(func=cmd_compare)
