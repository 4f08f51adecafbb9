"""``somoe eval RUN``: loss, perplexity and bits per byte of a run or checkpoint."""

from __future__ import annotations

from ._numbers import count

from ._run_args import print_result


def cmd_eval(args) -> int:
    from ..evaluate.scoring import evaluate_run

    result = evaluate_run(args.run, data=args.data, adapt=args.adapt, max_batches=args.batches,
                          which=args.checkpoint, device=args.device, seq_len=args.seq_len)
    return print_result(args, result, f"loss {result['loss']:.4f} | ppl {result['ppl']:.3f} | bpb {result['bpb']:.4f} | "
                                      f"{result['tokens']:,} tokens, {result['bytes']:,} bytes, {result['seq_len']}-token windows")


def register(sub) -> None:
    p = sub.add_parser("eval", help="loss, perplexity and bits per byte of a run or checkpoint")
    p.add_argument("run")
    p.add_argument("--data", help="a local .txt/.jsonl/.parquet file (default: the run's validation split)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--adapt", action="store_true", help="let SoME keys self-organize during eval (ablation C)")
    p.add_argument("--batches", type=count(0), default=0, help="cap on eval batches (0 = all)")
    p.add_argument("--seq-len", type=count(0), default=0,
                   help="score in windows of this many tokens (0 = the run's data.seq_len; longer ones need "
                        "RoPE or sinusoidal positions, untrained past the run's length)")
    p.add_argument("--checkpoint", choices=["last", "best"], default="last")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_eval)
