"""``somoe export RUN OUT``: a Hugging Face ``transformers`` folder (see ``somoe.hf.export``)."""

from __future__ import annotations

from ._numbers import count


def register(sub) -> None:
    p = sub.add_parser("export", help="write a run as a Hugging Face transformers folder (native GPT-2/Llama/"
                                      "Mixtral classes where exact, else remote code)")
    p.add_argument("run", help="a run folder or step-XXXXXXXX checkpoint")
    p.add_argument("out", help="the folder to write (must be empty or absent unless --force)")
    p.add_argument("--force", action="store_true", help="replace a non-empty OUT")
    p.add_argument("--step", type=count(0), default=None, help="export this step's checkpoint (default: the last)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..hf.export import export_run
    from ._outputs import check_output

    check_output(args.out, "OUT")
    export_run(args.run, args.out, force=args.force, step=args.step)
    return 0
