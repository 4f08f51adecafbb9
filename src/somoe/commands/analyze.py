"""``somoe analyze RUN``: knowledge galaxies, key movement, usage, dormancy, specialisation of a SoME run."""

from __future__ import annotations

from ._numbers import count


def cmd_analyze(args) -> int:
    from pathlib import Path

    from ..analysis.run_analysis import analyze_run
    from ._outputs import new_output

    k = args.clusters or None
    out = new_output(args, args.out or Path(args.run) / "analysis")
    analyze_run(args.run, checkpoints=args.checkpoints, out=out, data=args.data,
                sample_batches=args.sample_batches, method=args.method, k=k, device=args.device)
    return 0


def register(sub) -> None:
    p = sub.add_parser("analyze", help="plots and analysis.md of a SoME run's key stores, usage and experts")
    p.add_argument("run", help="a run folder with checkpoints")
    p.add_argument("--checkpoints", default="all",
                   help="'all' (default), 'last', or comma-separated steps, e.g. 100,400")
    p.add_argument("--out", help="output folder (default RUN/analysis)")
    p.add_argument("--data", help="held-out text file for the specialisation table (default: the run's validation split)")
    p.add_argument("--sample-batches", type=count(1), default=20, help="held-out batches of 8 windows for specialisation")
    p.add_argument("--method", choices=["kmeans", "agglomerative"], default="kmeans", help="key clustering")
    p.add_argument("--clusters", type=count(0), default=0, help="number of clusters (0 = best silhouette in 2..12)")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_analyze)
