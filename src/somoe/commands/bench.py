"""``somoe bench layer|train|generate|memory|ops|compile|gpu``: speed against references run in the same process, and memory.

Each prints a table (and notes, e.g. skipped ``transformers`` rows); with
``--json`` one object ``{"rows": [...]}`` on stdout (notes go to stderr).
"""

from __future__ import annotations

import json
import sys

from ._numbers import count, number


def register(sub) -> None:
    p = sub.add_parser("bench", help="speed/memory benchmarks (vs dense, GPT-2 and transformers)")
    kinds = p.add_subparsers(dest="bench_kind", required=True, metavar="{layer,train,generate,memory,ops,compile,gpu}")

    def common(q, reps: int):
        q.add_argument("--json", action="store_true", help='print {"rows": [...]} instead of a table')
        q.add_argument("--quick", action="store_true", help="a small grid / few presets / fewer repetitions")
        q.add_argument("--reps", type=count(1), default=reps, help="timed repetitions per implementation (median)")
        q.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32, bf16")
        q.add_argument("--threads", type=count(0, 4096), default=0, help="torch intra-op threads (0: torch's default)")
        q.add_argument("--device", default="cpu")

    q = kinds.add_parser("layer", help="FFN layer forward+backward: SoME, MoE, dense, transformers' Mixtral block")
    common(q, 5)
    q.add_argument("--grid", default="", help="E:k pairs, e.g. 8:2,64:4,128:8 (default; --quick: 64:4)")
    q.add_argument("--tokens", type=count(1), default=4096)
    q.add_argument("--d-model", type=count(1), default=256)
    q.add_argument("--d-ffn", type=count(1), default=512)
    _router_arg(q, "cpu_some_pk's layer at N = 65,536 and 1,048,576 beside cpu_some's, with the time shares of "
                   "scoring and top-k, weight generation, expert compute and the rules, and peak memory")
    q.set_defaults(func=cmd_layer)

    q = kinds.add_parser("train", help="tokens/s of training steps: presets vs cpu_gpt2 and transformers' GPT-2")
    common(q, 3)
    q.add_argument("--presets", default="", help="comma list (default cpu_gpt2,cpu_some,quickstart)")
    q.add_argument("--compile", action="store_true", help="torch.compile every model (compilation is not timed)")
    q.add_argument("--reference", default="cpu_gpt2", help="the preset the other presets' ratio is taken against")
    _router_arg(q, "cpu_some_pk's training step at N = 1,024 ... 1,048,576 (the expert-count sweep's) beside cpu_some's, with peak memory")
    q.add_argument("overrides", nargs="*", metavar="key=value", help="applied to every preset, e.g. train.batch_size=8")
    q.set_defaults(func=cmd_train)

    q = kinds.add_parser("generate", help="KV-cache generation tokens/s vs transformers' generate")
    common(q, 3)
    q.add_argument("--preset", default="cpu_gpt2")
    q.add_argument("--batch", type=count(1), default=8)
    q.add_argument("--prompt-len", type=count(1), default=32)
    q.add_argument("--new-tokens", type=count(1), default=64)
    q.add_argument("overrides", nargs="*", metavar="key=value")
    q.set_defaults(func=cmd_generate)

    q = kinds.add_parser("memory", help="parameter/optimizer/checkpoint bytes and a measured CPU step")
    q.add_argument("--json", action="store_true")
    q.add_argument("--quick", action="store_true",
                   help=f"measure the step on {QUICK_MEMORY_SEQ_LEN}-token sequences (unless --seq-len is given); "
                        f"the counts are the same")
    q.add_argument("--preset", default="seed000_some", help="comma list of presets")
    q.add_argument("--batch", type=count(1), default=1)
    q.add_argument("--seq-len", type=count(0), default=0, help="0: the preset's data.seq_len")
    q.add_argument("--no-measure", action="store_true", help="count only (meta device, no forward/backward)")
    q.add_argument("--budget-gib", type=number(0.0, 1e6, low_open=True), default=24.0)
    q.add_argument("overrides", nargs="*", metavar="key=value")
    q.set_defaults(func=cmd_memory)

    q = kinds.add_parser("ops", help="non-view ATen ops of one FFN layer's forward+backward: dense, moe, some")
    q.add_argument("--json", action="store_true")
    q.add_argument("--dtypes", default="fp32", help="comma list of fp32, bf16")
    q.add_argument("--paths", default="host,device", help="host (the CPU's per-expert loop), device (the GPU path)")
    q.add_argument("--top", type=count(0), default=0, help="also list the N most frequent ops per row")
    q.add_argument("--grid", default="64:4", help="E:k pairs")
    q.add_argument("--tokens", type=count(1), default=256)
    q.add_argument("--d-model", type=count(1), default=64)
    q.add_argument("--d-ffn", type=count(1), default=128)
    q.set_defaults(func=cmd_ops)

    q = kinds.add_parser("compile", help="graph breaks, compiles, recompiles and compile time of a preset's training step")
    q.add_argument("--json", action="store_true")
    q.add_argument("--preset", default="cpu_some", help="comma list of presets")
    q.add_argument("--steps", type=count(2), default=6, help="training steps (top-k warm-up, an eval and a reload inside)")
    q.add_argument("--backend", default="inductor", help="torch.compile backend (eager, aot_eager, inductor)")
    q.add_argument("--dtypes", default="bf16", help="comma list of fp32, bf16")
    q.add_argument("--device", default="cpu")
    q.add_argument("--threads", type=count(0, 4096), default=0, help="torch intra-op threads (0: torch's default)")
    q.add_argument("--fullgraph", action="store_true", help="fail on the first graph break instead of counting")
    q.add_argument("--scope", choices=("step", "model"), default="step",
                   help="step: the whole training step as train.compile=step runs it; model: the model alone")
    q.add_argument("overrides", nargs="*", metavar="key=value")
    q.set_defaults(func=cmd_compile)

    q = kinds.add_parser("gpu", help="full-size training steps of the seed presets: eager, compiled, CUDA graphs; MFU")
    q.add_argument("--json", action="store_true")
    q.add_argument("--presets", default="seed000_gpt2,seed000_some,seed003_nanogpt_moe")
    q.add_argument("--modes", default="eager,compiled,cudagraphs", help="comma list of eager, compiled, cudagraphs")
    q.add_argument("--steps", type=count(1), default=10, help="timed steps per row (after --warmup)")
    q.add_argument("--warmup", type=count(0), default=3)
    q.add_argument("--backend", default="inductor", help="torch.compile backend of the compiled mode")
    q.add_argument("--device", default="cuda")
    q.add_argument("--threads", type=count(0, 4096), default=0)
    q.add_argument("--no-hf", action="store_true", help="skip transformers' GPT2LMHeadModel rows")
    q.add_argument("overrides", nargs="*", metavar="key=value", help="applied to every preset (a CPU dry run shrinks them)")
    q.set_defaults(func=cmd_gpu)


def _router_arg(q, product_help: str) -> None:
    q.add_argument("--router", choices=("exhaustive", "product"), default="exhaustive",
                   help=f"product: {product_help} (each row in its own process)")


def _product_rows(args, kind: str) -> int:
    from ..bench import product_keys

    sizes = product_keys.LAYER_SIZES if kind == "layer" else product_keys.TRAIN_SIZES
    dtype = _dtypes(args)[-1]  # one dtype: bf16 unless asked for fp32 alone
    rows = product_keys.bench_product(kind, sizes, dtype, reps=min(args.reps, 3) if args.quick else args.reps,
                                      rounds=1 if args.quick else 2, threads=args.threads)
    return _emit(args, rows, product_keys.LAYER_COLUMNS if kind == "layer" else product_keys.TRAIN_COLUMNS, [])


QUICK_MEMORY_SEQ_LEN = 64  # bench memory --quick: a short measured step, seconds instead of minutes on a CPU


def _dtypes(args) -> tuple[str, ...]:
    from ..config import ConfigError

    dtypes = tuple(d.strip() for d in args.dtypes.split(",") if d.strip())
    bad = [d for d in dtypes if d not in ("fp32", "bf16")]
    if bad or not dtypes:
        raise ConfigError(f"--dtypes {args.dtypes!r}: use a comma list of fp32 and bf16")
    return dtypes


def _setup(args) -> None:
    from ..train.runtime import DEVICE_FLAG, resolve_device, setup_backends

    # as training sets them up (the CPU allocator setting; TF32 and cuDNN autotuning on a GPU):
    # both sides of every ratio run with them
    setup_backends(resolve_device(args.device, setting=DEVICE_FLAG), args.threads)


def _grid(text: str) -> tuple[tuple[int, int], ...]:
    from ..config import ConfigError

    try:
        pairs = tuple(tuple(int(v) for v in item.split(":")) for item in text.split(",") if item.strip())
    except ValueError:
        pairs = ()
    if not pairs or any(len(p) != 2 or p[0] < 1 or not 1 <= p[1] <= p[0] for p in pairs):
        raise ConfigError(f"--grid {text!r}: give E:k pairs with 1 <= k <= E, e.g. --grid 8:2,64:4")
    return pairs


def _emit(args, rows: list[dict], columns: list[str], notes: list[str]) -> int:
    from ..bench.common import table

    if args.json:
        print(json.dumps({"rows": rows}))
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
    else:
        print(table(rows, columns))
        for note in notes:
            print(f"note: {note}")
    return 0


def cmd_layer(args) -> int:
    from ..bench import layer

    if args.router == "product":
        return _product_rows(args, "layer")
    _setup(args)
    grid = _grid(args.grid) if args.grid else (layer.QUICK_GRID if args.quick else layer.DEFAULT_GRID)
    notes: list[str] = []
    rows = layer.bench_layer(grid, _dtypes(args), args.tokens, args.d_model, args.d_ffn,
                             reps=min(args.reps, 3) if args.quick else args.reps, device=args.device, notes=notes)
    return _emit(args, rows, layer.COLUMNS, notes)


def cmd_train(args) -> int:
    from ..bench import train

    if args.router == "product":
        return _product_rows(args, "train")
    _setup(args)
    presets = tuple(p for p in args.presets.split(",") if p) or (
        ("cpu_gpt2", "cpu_some") if args.quick else train.DEFAULT_PRESETS)
    notes: list[str] = []
    rows = train.bench_train(presets, _dtypes(args), reps=min(args.reps, 2) if args.quick else args.reps,
                             device=args.device, overrides=tuple(args.overrides), notes=notes, compile=args.compile,
                             reference=args.reference)
    return _emit(args, rows, train.COLUMNS, notes)


def cmd_generate(args) -> int:
    from ..bench import generate

    _setup(args)
    notes: list[str] = []
    new_tokens = min(args.new_tokens, 16) if args.quick else args.new_tokens
    rows = generate.bench_generate(args.preset, _dtypes(args), args.batch, args.prompt_len, new_tokens,
                                   reps=min(args.reps, 2) if args.quick else args.reps, device=args.device,
                                   overrides=tuple(args.overrides), notes=notes)
    return _emit(args, rows, generate.COLUMNS, notes)


def cmd_memory(args) -> int:
    from ..bench import memory
    from ..train.runtime import keep_freed_cpu_memory

    keep_freed_cpu_memory()  # the peak a training process on the CPU reaches, with training's allocator settings
    seq_len = args.seq_len or (QUICK_MEMORY_SEQ_LEN if args.quick else None)
    rows = [memory.memory_report(p, args.batch, seq_len, not args.no_measure, tuple(args.overrides),
                                 args.budget_gib) for p in args.preset.split(",") if p]
    notes = [f"{r['preset']}: peak RSS {r['rss_peak_bytes'] / memory.GIB:.2f} GiB of a {args.budget_gib:g} GiB budget "
             f"(fits: {r['fits_budget']})" for r in rows if "rss_peak_bytes" in r]
    return _emit(args, rows, memory.COLUMNS, notes)


def cmd_ops(args) -> int:
    from ..bench import ops
    from ..bench.layer import LayerShape
    from ..config import ConfigError

    paths = tuple(p.strip() for p in args.paths.split(",") if p.strip())
    if not paths or any(p not in ops.PATHS for p in paths):
        raise ConfigError(f"--paths {args.paths!r}: use a comma list of {', '.join(ops.PATHS)}")
    rows = []
    for E, k in _grid(args.grid):
        shape = LayerShape(args.tokens, args.d_model, args.d_ffn, E, k)
        rows += ops.bench_ops(shape, _dtypes(args), paths, top=args.top)
    return _emit(args, rows, ops.COLUMNS, [])


def cmd_compile(args) -> int:
    from ..bench import compile as compile_bench
    from ..config import ConfigError

    if args.steps < 2:
        raise ConfigError(f"--steps {args.steps}: give at least 2 (the first step compiles)")
    _setup(args)
    rows = [compile_bench.compile_report(p, args.steps, tuple(args.overrides), args.backend, dtype, args.device,
                                         args.fullgraph, args.scope)
            for p in args.preset.split(",") if p for dtype in _dtypes(args)]
    notes = [f"{r['preset']} {r['dtype']}: break {reason.splitlines()[0]}" for r in rows for reason in r["break_reasons"]]
    return _emit(args, rows, compile_bench.COLUMNS, notes)


def cmd_gpu(args) -> int:
    from ..bench import gpu
    from ..config import ConfigError

    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    if not modes or any(m not in gpu.MODES for m in modes):
        raise ConfigError(f"--modes {args.modes!r}: use a comma list of {', '.join(gpu.MODES)}")
    if args.steps < 1:
        raise ConfigError(f"--steps {args.steps}: give at least 1")
    _setup(args)
    notes: list[str] = []
    rows = gpu.bench_gpu(tuple(p for p in args.presets.split(",") if p), modes, args.steps, args.warmup, args.device,
                         tuple(args.overrides), args.backend, not args.no_hf, notes)
    return _emit(args, rows, gpu.COLUMNS, notes)
