"""``somoe adapt RUN [--shift-data FILE]``: ablation C, frozen keys vs self-organization at inference."""

from __future__ import annotations

from ._numbers import count


def cmd_adapt(args) -> int:
    from ..analysis.adaptation import run_adaptation
    from ._outputs import new_output

    out = new_output(args, args.out) if args.out else None  # default RUN/adapt: written only at the end
    run_adaptation(args.run, args.shift_data, out=out, in_data=args.in_data, pre=args.pre_batches,
                   shift=args.shift_batches, heldout=args.heldout_batches, batch_size=args.batch_size,
                   which=args.checkpoint, device=args.device)
    return 0


def register(sub) -> None:
    p = sub.add_parser("adapt", help="ablation C: perplexity under a domain shift, keys frozen vs self-organizing")
    p.add_argument("run", help="a SoME run folder or checkpoint")
    p.add_argument("--shift-data", help="out-of-domain text (.txt/.jsonl/.parquet; default: the built-in "
                                        "The Adventures of Sherlock Holmes)")
    p.add_argument("--in-data", help="in-domain text (default: the run's validation split)")
    p.add_argument("--pre-batches", type=count(1), default=8, help="in-domain batches before the shift")
    p.add_argument("--shift-batches", type=count(1), default=24, help="out-of-domain batches after the shift")
    p.add_argument("--heldout-batches", type=count(1), default=8, help="held-out batches of each domain for the "
                                                                   "post-shift and forgetting scores")
    p.add_argument("--batch-size", type=count(1), default=8, help="windows of seq_len tokens per batch")
    p.add_argument("--out", help="output folder (default RUN/adapt)")
    p.add_argument("--checkpoint", choices=["last", "best"], default="last")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_adapt)
