"""The ``somoe`` command line: prepare, train, eval, generate, params, report, presets, quickstart."""

from __future__ import annotations

import argparse
import gc
import json
import signal
import sys
from pathlib import Path

from .config import ConfigError, list_presets, load_config


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", help="a shipped preset (see `somoe presets`)")
    p.add_argument("--config", help="a YAML config file")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.lr=4e-4")


def _load(args) -> "RunConfig":  # noqa: F821
    preset = args.preset if (args.preset or args.config) else "quickstart"
    return load_config(preset=preset if not args.config else None, config_file=args.config,
                       overrides=args.overrides)


def _run_dir(args, cfg) -> Path:
    run_dir = Path(args.out) if args.out else Path("runs") / cfg.name
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--out {run_dir} is a file, not a folder; choose another --out")
    return run_dir


def cmd_presets(args) -> int:
    for name in list_presets():
        cfg = load_config(preset=name)
        print(f"{name:24s} {cfg.description.splitlines()[0] if cfg.description else ''}")
    return 0


def cmd_params(args) -> int:
    from .models.sizing import count_params

    cfg = _load(args)
    counts = count_params(cfg.model)
    if args.json:
        print(json.dumps(counts))
    else:
        print(f"{cfg.name}: total {counts['total']:,} ({counts['total'] / 1e6:.2f}M), "
              f"trainable {counts['trainable']:,} ({counts['trainable'] / 1e6:.2f}M)")
    return 0


def cmd_prepare(args) -> int:
    from .data import prepare_data

    cfg = _load(args)
    run_dir = _run_dir(args, cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    data = prepare_data(cfg, run_dir)
    print(f"train: {data.train.n_stories:,} stories, {len(data.train):,} tokens | "
          f"val: {data.val.n_stories:,} stories, {len(data.val):,} tokens | tokenizer {data.tokenizer_path}")
    return 0


def cmd_train(args) -> int:
    cfg = _load(args)
    if args.dry_run:
        return cmd_params(argparse.Namespace(**{**vars(args), "json": False}))
    from .report.summary import write_report
    from .train.dist import cleanup
    from .train.trainer import Trainer

    run_dir = _run_dir(args, cfg)
    trainer = Trainer(cfg, run_dir, resume=args.resume, progress=not args.no_progress)
    trainer.log(f"run folder {run_dir} | device {trainer.device} | precision {trainer.precision} | "
                f"{trainer.total_steps} steps | params {trainer.model.param_counts()}")
    try:
        trainer.fit()
        if trainer.dist.is_main:
            print(write_report(run_dir), end="")
        if trainer.stop_signal is not None:  # saved and stopped: the shell's code for death by that signal
            return 128 + signal.Signals[trainer.stop_signal].value
    finally:
        # drop the DDP wrapper (it holds the process group) before leaving the group: a gloo
        # group torn down by the interpreter at exit can abort the process
        del trainer
        gc.collect()
        cleanup()
    return 0


def cmd_eval(args) -> int:
    from .evaluate.scoring import evaluate_run

    result = evaluate_run(args.run, data=args.data, adapt=args.adapt, max_batches=args.batches,
                          which=args.checkpoint, device=args.device)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"loss {result['loss']:.4f} | ppl {result['ppl']:.3f} | bpb {result['bpb']:.4f} | "
              f"{result['tokens']:,} tokens, {result['bytes']:,} bytes")
    return 0


def cmd_generate(args) -> int:
    from .generate.sampling import GenerationConfig, generate_text, interactive
    from .evaluate.runs import load_run

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


def cmd_report(args) -> int:
    from .report.summary import write_report

    print(write_report(Path(args.run)), end="")
    return 0


def cmd_quickstart(args) -> int:
    from .experiments.quickstart import run_quickstart

    return run_quickstart(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="somoe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("presets", help="list the shipped presets")
    p.set_defaults(func=cmd_presets)

    p = sub.add_parser("params", help="total and trainable parameters of a config (no allocation)")
    _config_args(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_params)

    p = sub.add_parser("prepare", help="train/reuse the tokenizer and pretokenize the data")
    _config_args(p)
    p.add_argument("--out", help="run folder (default runs/NAME)")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="train a model")
    _config_args(p)
    p.add_argument("--out", help="run folder (default runs/NAME)")
    p.add_argument("--resume", help="'auto' (newest checkpoint of the run folder) or a step-XXXXXXXX folder")
    p.add_argument("--dry-run", action="store_true", help="print parameter counts and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="loss, perplexity and bits per byte of a run or checkpoint")
    p.add_argument("run")
    p.add_argument("--data", help="a local .txt/.jsonl/.parquet file (default: the run's validation split)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--adapt", action="store_true", help="let SoME keys self-organize during eval (ablation C)")
    p.add_argument("--batches", type=int, default=0, help="cap on eval batches (0 = all)")
    p.add_argument("--checkpoint", choices=["last", "best"], default="last")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("generate", help="sample text from a run or checkpoint")
    p.add_argument("run")
    p.add_argument("--prompt", action="append", help="a prompt (repeat for a batch)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--greedy", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--interactive", action="store_true", help="a prompt loop (/temp, /topk, /quit ...)")
    p.add_argument("--checkpoint", choices=["last", "best"], default="last")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("report", help="rebuild summary.txt and metrics.png from metrics.jsonl")
    p.add_argument("run")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("quickstart", help="the main job: cpu_gpt2 vs cpu_some vs cpu_moe on real "
                                                "stories: table, samples, curves, verdict")
    p.add_argument("--data", help="a folder with TinyStories train.txt and dev.txt (or valid.txt) instead of "
                                  "the built-in TinyStories stories")
    p.add_argument("--presets", help="comma-separated presets to train and compare (default: cpu_gpt2,cpu_some,cpu_moe)")
    p.add_argument("--moe", action="store_true", help="add the classic MoE baseline (cpu_moe) to a --presets list")
    p.add_argument("--out", default="runs/quickstart")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=cmd_quickstart)

    from .commands import register_all

    register_all(sub)  # upcycle, transition, bench, analyze, compare, sweep, adapt, ...
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .train.checkpoint import CheckpointError
    from .train.nonfinite import TrainingDiverged

    try:
        return args.func(args)
    except (ConfigError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except TrainingDiverged as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
