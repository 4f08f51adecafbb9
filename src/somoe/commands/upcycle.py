"""``somoe upcycle DENSE_RUN --out DIR``: dense -> MoE with verified equivalence (seed 004)."""

from __future__ import annotations

from ._numbers import count, number


def register(sub) -> None:
    p = sub.add_parser("upcycle", help="turn a dense run into an equivalent MoE run (experts = the dense FFN, "
                                       "zero router), verified on a probe batch")
    p.add_argument("run", help="a dense run folder or step-XXXXXXXX checkpoint")
    p.add_argument("--out", required=True, help="the new MoE run folder (must have no checkpoints)")
    p.add_argument("--experts", type=count(1), default=None, help="experts per layer (default: the run's model.moe)")
    p.add_argument("--top-k", type=count(1), default=None, help="experts per token (default: the run's model.moe)")
    p.add_argument("--checkpoint", choices=["last", "best"], default="last")
    p.add_argument("--probe-sequences", type=count(1), default=8, help="validation windows in the frozen probe batch")
    p.add_argument("--tolerance", type=number(0.0, 1e6, low_open=True), default=1e-4, help="max |logit difference| allowed (fp32)")
    p.add_argument("--device", default="auto")
    p.add_argument("--set", action="append", default=[], metavar="key=value", dest="overrides",
                   help="a model.moe.* setting of the MoE run (repeatable), e.g. --set model.moe.aux_loss_coef=0.02")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..experiments.upcycle import upcycle_run
    from ._outputs import new_output, remove_new_outputs

    out = new_output(args, args.out)
    result = upcycle_run(args.run, out, args.experts, args.top_k, args.overrides, args.checkpoint,
                         args.probe_sequences, args.tolerance, args.device)
    if not result.passed:
        remove_new_outputs(args)  # nothing was written into it
    return 0 if result.passed else 1
