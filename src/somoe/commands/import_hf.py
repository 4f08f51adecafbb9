"""``somoe import-hf DIR --out RUN``: a local GPT-2 / Llama checkpoint as a somoe dense run."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("import-hf", help="turn a local Hugging Face GPT2LMHeadModel or LlamaForCausalLM folder "
                                         "into a somoe dense run (then train, eval, generate, upcycle it)")
    p.add_argument("folder", help="a local model folder: config.json, model.safetensors (or shards), tokenizer.json")
    p.add_argument("--out", required=True, help="the new run folder")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..hf.import_hf import import_hf
    from ._outputs import check_output

    check_output(args.out, "--out")
    import_hf(args.folder, args.out)
    return 0
