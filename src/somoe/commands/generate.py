"""``somoe generate RUN``: sample text from a run or checkpoint, for given prompts or in a prompt loop."""

from __future__ import annotations

from ._numbers import count, number


def cmd_generate(args) -> int:
    from ..evaluate.runs import load_run
    from ..generate.sampling import GenerationConfig, generate_text, interactive

    gen = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                           top_p=args.top_p, greedy=args.greedy, seed=args.seed)  # bad settings fail before loading
    run = load_run(args.run, device=args.device, which=args.checkpoint)
    if args.interactive:
        interactive(run.model, run.tokenizer, gen)
        return 0
    prompts = args.prompt or ["Once upon a time"]
    for prompt, text in zip(prompts, generate_text(run.model, run.tokenizer, prompts, gen)):
        print(f"{prompt}{text}")
        print("-" * 40)
    return 0


def register(sub) -> None:
    p = sub.add_parser("generate", help="sample text from a run or checkpoint")
    p.add_argument("run")
    p.add_argument("--prompt", action="append", help="a prompt (repeat for a batch)")
    p.add_argument("--max-new-tokens", type=count(0), default=200)
    p.add_argument("--temperature", type=number(0.0, 1e6), default=0.8)
    p.add_argument("--top-k", type=count(0), default=0)
    p.add_argument("--top-p", type=number(0.0, 1.0, low_open=True), default=0.95)
    p.add_argument("--greedy", action="store_true")
    p.add_argument("--seed", type=count(0, 2**63 - 1), default=0)
    p.add_argument("--interactive", action="store_true", help="a prompt loop (/temp, /topk, /quit ...)")
    p.add_argument("--checkpoint", choices=["last", "best"], default="last")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_generate)
