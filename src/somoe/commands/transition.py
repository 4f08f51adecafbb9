"""``somoe transition --preset X --out DIR``: dense phase, verified upcycling, MoE phase (seed 004)."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("transition", help="train dense, upcycle to MoE (verified), train the MoE; boundary summary")
    p.add_argument("--preset", help="a transition preset (e.g. cpu_transition, seed004_simple, seed004_smollm)")
    p.add_argument("--config", help="a YAML config file")
    p.add_argument("--out", help="output folder (default runs/NAME)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides, e.g. train.max_steps=300 transition.moe_lr=5e-4")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from ..config import ConfigError, load_config
    from ..experiments.transition import run_transition
    from ._outputs import new_output

    if not (args.preset or args.config):
        raise ConfigError("somoe transition needs --preset (e.g. cpu_transition) or --config FILE")
    cfg = load_config(preset=args.preset, config_file=args.config, overrides=args.overrides)
    out = new_output(args, Path(args.out) if args.out else Path("runs") / cfg.name)
    return run_transition(cfg, out, progress=not args.no_progress)
