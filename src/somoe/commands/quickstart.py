"""``somoe quickstart``: the main job (cpu_gpt2 vs cpu_some vs cpu_moe on real stories)."""

from __future__ import annotations

from ._run_args import add_allow_change_arg


def cmd_quickstart(args) -> int:
    from ..experiments.quickstart import main_job_folder, run_quickstart
    from ._outputs import new_output

    args.out = str(new_output(args, args.out or main_job_folder(args.data)))
    return run_quickstart(args)


def register(sub) -> None:
    p = sub.add_parser("quickstart", help="the main job: cpu_gpt2 vs cpu_some vs cpu_moe on real "
                                                "stories: table, samples, curves, verdict")
    p.add_argument("--data", help="a folder with TinyStories train.txt and dev.txt (or valid.txt) instead of "
                                  "the built-in TinyStories stories")
    p.add_argument("--presets", help="comma-separated presets to train and compare (default: cpu_gpt2,cpu_some,cpu_moe)")
    p.add_argument("--moe", action="store_true", help="add the classic MoE baseline (cpu_moe) to a --presets list")
    p.add_argument("--out", help="output folder (default runs/main_job/builtin, or runs/main_job/NAME-HASH for "
                                 "--data folder NAME: each data set gets its own runs)")
    add_allow_change_arg(p)
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=cmd_quickstart)
