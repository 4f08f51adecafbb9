"""``somoe presets`` (the shipped presets) and ``somoe params`` (a config's parameter counts, no allocation)."""

from __future__ import annotations

from ._run_args import add_config_args, load_run_config, print_result


def cmd_presets(args) -> int:
    from ..config import list_presets, load_config

    for name in list_presets():
        cfg = load_config(preset=name)
        print(f"{name:24s} {cfg.description.splitlines()[0] if cfg.description else ''}")
    return 0


def cmd_params(args) -> int:
    from ..models.sizing import count_params

    cfg = load_run_config(args)
    counts = count_params(cfg.model)
    line = (f"{cfg.name}: total {counts['total']:,} ({counts['total'] / 1e6:.2f}M), "
            f"trainable {counts['trainable']:,} ({counts['trainable'] / 1e6:.2f}M)")
    if "procedural" in counts:
        line += (f"; stored {counts['stored']:,} ({counts['stored'] / 1e6:.2f}M), procedural (computed on demand, "
                 f"never held) {counts['procedural']:,} ({counts['procedural'] / 1e6:.2f}M)")
    return print_result(args, counts, line)


def register(sub) -> None:
    p = sub.add_parser("presets", help="list the shipped presets")
    p.set_defaults(func=cmd_presets)

    p = sub.add_parser("params", help="total and trainable parameters of a config (no allocation)")
    add_config_args(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_params)
