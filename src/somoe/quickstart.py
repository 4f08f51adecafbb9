"""The main job: train the quickstart preset (offline by default), evaluate, and sample."""

from __future__ import annotations

from pathlib import Path

from .config import ConfigError, load_config


def data_overrides(folder: str | None) -> list[str]:
    """``--data DIR`` -> overrides pointing at DIR/train.txt and its dev/valid file."""
    if not folder:
        return []
    root = Path(folder)
    train = root / "train.txt"
    val = next((root / n for n in ("dev.txt", "valid.txt", "validation.txt", "val.txt") if (root / n).is_file()),
               None)
    if not train.is_file():
        raise ConfigError(f"{root} has no train.txt; point --data at a folder with TinyStories train.txt/dev.txt")
    out = [f"data.train_path={train.resolve()}"]
    if val is not None:
        out.append(f"data.val_path={val.resolve()}")
    return out


def run_quickstart(args) -> int:
    from .eval import evaluate
    from .generate import GenerationConfig, generate_text
    from .report import write_report
    from .data import eval_batches
    from .train.trainer import Trainer

    cfg = load_config(preset="quickstart", overrides=data_overrides(args.data) + list(args.overrides))
    run_dir = Path(args.out)
    trainer = Trainer(cfg, run_dir, resume="auto")
    trainer.log(f"quickstart: {trainer.total_steps} steps on {cfg.data.source if not args.data else args.data} "
                f"| device {trainer.device} | precision {trainer.precision} | run folder {run_dir}")
    trainer.fit()
    print(write_report(run_dir), end="")
    windows = eval_batches(trainer.data.val, cfg.data.seq_len, 16)
    result = evaluate(trainer.model, windows, trainer.data.tokenizer.token_byte_lengths(), trainer.device,
                      trainer.autocast)
    print(f"full validation set: loss {result.loss:.4f} | ppl {result.ppl:.3f} | bpb {result.bpb:.4f} "
          f"({result.tokens:,} tokens)")
    gen = GenerationConfig(max_new_tokens=120, temperature=0.8, top_p=0.95, seed=0)
    for prompt in ("Once upon a time", "Tom and his dog"):
        text = generate_text(trainer.model, trainer.data.tokenizer, [prompt], gen)[0]
        print(f"\n--- sample ---\n{prompt}{text}")
    return 0
