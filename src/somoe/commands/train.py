"""``somoe prepare`` (tokenizer + pretokenized data) and ``somoe train`` (train, resume, report)."""

from __future__ import annotations

import argparse
import gc
import signal

from ._run_args import add_allow_change_arg, add_config_args, load_run_config, run_dir


def cmd_prepare(args) -> int:
    from ..data import prepare_data

    cfg = load_run_config(args)
    folder = run_dir(args, cfg)
    data = prepare_data(cfg, folder)
    print(f"train: {data.train.n_stories:,} stories, {len(data.train):,} tokens | "
          f"val: {data.val.n_stories:,} stories, {len(data.val):,} tokens | tokenizer {data.tokenizer_path}")
    return 0


def cmd_train(args) -> int:
    cfg = load_run_config(args)
    if args.dry_run:
        from .configs import cmd_params

        return cmd_params(argparse.Namespace(**{**vars(args), "json": False}))
    from ..config import ConfigError
    from ..report.summary import write_report
    from ..train.checkpoint import list_checkpoints
    from ..train.dist import cleanup
    from ..train.trainer import Trainer

    check_resume_arg(args.resume)
    folder = run_dir(args, cfg)
    if args.resume in (None, "", "never") and list_checkpoints(folder):  # before the lock file is written
        raise ConfigError(f"run folder {folder} already has checkpoints; pass --resume auto to continue it or "
                          f"choose another --out")
    trainer = Trainer(cfg, folder, resume=args.resume, progress=not args.no_progress,
                      allow_config_change=tuple(args.allow_config_change))
    trainer.log(f"run folder {folder} | device {trainer.device} | precision {trainer.precision} | "
                f"{trainer.total_steps} steps | params {trainer.model.param_counts()}")
    try:
        trainer.fit()
        if trainer.dist.is_main:
            print(write_report(folder), end="")
        if trainer.stop_signal is not None:  # saved and stopped: the shell's code for death by that signal
            return 128 + signal.Signals[trainer.stop_signal].value
    finally:
        # drop the DDP wrapper (it holds the process group) before leaving the group: a gloo
        # group torn down by the interpreter at exit can abort the process
        del trainer
        gc.collect()
        cleanup()
    return 0


def check_resume_arg(resume: str | None) -> None:
    """``--resume`` is auto, never, or a checkpoint folder."""
    from pathlib import Path

    from ..config import ConfigError

    if resume not in (None, "", "auto", "never") and not (Path(resume) / "trainer_state.json").is_file():
        raise ConfigError(f"--resume {resume} is not a checkpoint folder (RUN/checkpoints/step-XXXXXXXX); pass one, "
                          f"or --resume auto for the run folder's newest")


def register(sub) -> None:
    p = sub.add_parser("prepare", help="train/reuse the tokenizer and pretokenize the data")
    add_config_args(p)
    p.add_argument("--out", help="run folder (default runs/NAME)")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="train a model")
    add_config_args(p)
    p.add_argument("--out", help="run folder (default runs/NAME)")
    p.add_argument("--resume", help="'auto' (newest checkpoint of the run folder) or a step-XXXXXXXX folder")
    p.add_argument("--dry-run", action="store_true", help="print parameter counts and exit")
    add_allow_change_arg(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)
