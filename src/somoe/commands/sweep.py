"""``somoe sweep SWEEP``: train a grid of overrides over a base preset, resumably, then compare the runs."""

from __future__ import annotations


def cmd_sweep(args) -> int:
    from ..config import ConfigError
    from ..experiments.quickstart import data_overrides
    from ..experiments.sweeps import list_sweeps, load_sweep, run_status, run_sweep

    if not (args.list or args.sweep):
        raise ConfigError("name a sweep file or a shipped sweep; `somoe sweep --list` shows the shipped ones")
    if args.list:
        for name in list_sweeps():
            sweep = load_sweep(name)
            print(f"{name:22s} {len(sweep.runs)} runs  {sweep.description}")
        return 0
    sweep = load_sweep(args.sweep)
    out = args.out or f"runs/sweeps/{sweep.name}"
    extra = data_overrides(args.data) + list(args.overrides)
    if args.dry_run:
        from pathlib import Path

        for run in sweep.runs:
            sweep.run_config(run, extra)  # validates every run's config
            state, step, total = run_status(Path(out) / run.name)
            print(f"{run.name:28s} {state:8s} {step}/{total or '?'}  {' '.join(run.overrides)}")
        return 0
    from ..train.stopping import last_exit_code
    from ._outputs import new_output

    new_output(args, out)
    return 0 if run_sweep(sweep, out, extra) else last_exit_code()


def register(sub) -> None:
    p = sub.add_parser("sweep", help="train a sweep of overrides over a preset (resumable), then compare")
    p.add_argument("sweep", nargs="?", help="a sweep YAML file or a shipped sweep name (see --list)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides for every run of the sweep")
    p.add_argument("--out", help="root folder of the run folders (default runs/sweeps/NAME)")
    p.add_argument("--data", help="a folder with TinyStories train.txt and dev.txt for every run")
    p.add_argument("--list", action="store_true", help="list the shipped sweeps")
    p.add_argument("--dry-run", action="store_true", help="validate the runs and show their status; train nothing")
    p.set_defaults(func=cmd_sweep)
