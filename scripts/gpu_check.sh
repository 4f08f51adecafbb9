#!/usr/bin/env bash
# Every GPU measurement in one call on a lent GPU machine (PyTorch + CUDA, transformers; no install),
# each step with its own time limit (they sum to <= 575 s) so that a slow or failing step costs only
# its share; results land in $OUT (default /tmp/somoe-gpu) as JSON, the log in gpu.log:
#   tests         the CUDA tests: dispatch paths, compiled model and compiled step vs eager, CUDA graphs
#   ops.json      somoe bench ops (CPU counts of the GPU path's ops)
#   compile.json  somoe bench compile on CUDA: the whole step's graph breaks, recompiles, compile time (inductor)
#   gpu_*.json    somoe bench gpu per preset: eager / compiled step / compiled step + CUDA graph: tokens/s, MFU,
#                 peak memory, step-time spread (+ transformers' GPT2LMHeadModel at seed000_gpt2's size)
#   layer.json    somoe bench layer at seed000 width: SoME vs dense vs transformers' MoE block
#   run_*/        seed000_gpt2 and seed000_some at full size on the shipped TinyStories stories: RUN_STEPS steps
#                 (compiled step + CUDA graph), eval (bpb) and checkpoint, then a resumed process to 2 x RUN_STEPS;
#                 runs.json: time per 1,000 steps and the projected hours of the seed's 20k-story schedule
#   bash scripts/gpu_check.sh
# A CPU dry run with tiny sizes (same steps, CPU devices, tiny overrides): DRY=1 bash scripts/gpu_check.sh
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/somoe-gpu}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# a step past its limit gets SIGABRT, on which Python prints every thread's stack to the log: where
# it hung, not just that it did (SIGTERM would let `somoe train` finish its step and checkpoint)
export PYTHONFAULTHANDLER=1
LOG="$OUT/gpu.log"
SOMOE="python3 -m somoe"  # the checkout's package on PYTHONPATH, nothing installed

step() {  # step NAME SECONDS CMD...: its stdout to $OUT/NAME.json when NAME ends in .json, else the log
  local name=$1 secs=$2 rc t0=$SECONDS
  shift 2
  echo "== $name (limit ${secs}s)" | tee -a "$LOG"
  if [[ $name == *.json ]]; then
    timeout -s ABRT -k 10 "$secs" "$@" >"$OUT/$name" 2>>"$LOG"
  else
    timeout -s ABRT -k 10 "$secs" "$@" >>"$LOG" 2>&1
  fi
  rc=$?
  echo "== $name: rc=$rc in $((SECONDS - t0))s" | tee -a "$LOG"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
} >>"$LOG" 2>&1
DEV=cuda BACKEND=inductor STEPS=10 TINY=() GRID=128:8 LAYER_SHAPE=(--tokens 8192 --d-model 768 --d-ffn 2304)
RUN_STEPS=300 LOG_EVERY=50 EVAL_BATCHES=40 RUN_MODE=(train.cuda_graphs=true train.precision=bf16) RUN_DATA=()
if [[ ${DRY:-0} == 1 ]]; then  # the same steps on the CPU at tiny sizes: checks the script, not the GPU
  DEV=cpu BACKEND=aot_eager STEPS=2 GRID=8:2 LAYER_SHAPE=(--tokens 64 --d-model 32 --d-ffn 16)
  LAYER_DTYPES=fp32  # bf16 is emulated (~30x slower) on CPUs without AMX
  export OMP_NUM_THREADS=1  # tiny ops on shared cores: OpenMP hand-offs would dominate (docs/performance-notes.md)
  RUN_STEPS=4 LOG_EVERY=2 EVAL_BATCHES=2 RUN_MODE=(train.precision=fp32)
  RUN_DATA=(model.vocab_size=320 data.builtin_train_stories=100 data.builtin_val_stories=20 data.tokenizer_train_stories=100)
  TINY=(model.d_model=32 model.n_layers=1 model.n_heads=2 model.vocab_size=64 model.max_seq_len=16 data.seq_len=16
        train.batch_size=2 model.d_ffn=64 model.some.num_experts=8 model.some.top_k=5 model.some.d_ffn=16
        model.moe.num_experts=4 model.moe.top_k=2 model.moe.d_ffn=16 "model.some.entropy_band=[1.0,1.5]")
fi
TESTS_K="dispatch or cuda_compiled_step or reduce-overhead"
[[ ${DRY:-0} == 1 ]] && TESTS_K="dispatch and not padded"
step tests 100 python3 -m pytest -q -p no:cacheprovider tests/models/test_dispatch_fast.py tests/models/test_dispatch.py \
  tests/models/test_compile_fullgraph.py tests/train/test_compiled_step.py -k "$TESTS_K"
step ops.json 25 $SOMOE bench ops --json
# first the whole step of seed000_some: its inductor graphs are then in the cache for the rows below
declare -A GPU_LIMIT=([seed000_gpt2]=65 [seed000_some]=70 [seed003_nanogpt_moe]=60)
step compile.json 55 $SOMOE bench compile --device $DEV --backend $BACKEND --preset seed000_some \
  --steps 4 --json "${TINY[@]}"
for preset in seed000_gpt2 seed000_some seed003_nanogpt_moe; do
  modes=eager,compiled,cudagraphs
  [[ $DEV == cpu ]] && modes=eager,compiled
  step "gpu_$preset.json" ${GPU_LIMIT[$preset]} $SOMOE bench gpu --device $DEV --backend $BACKEND --presets $preset --modes $modes \
    --steps $STEPS --json "${TINY[@]}"
done
step layer.json 40 $SOMOE bench layer --device $DEV --grid $GRID --dtypes ${LAYER_DTYPES:-bf16} --reps 10 "${LAYER_SHAPE[@]}" --json
# full-size runs: RUN_STEPS steps with an eval and a checkpoint, then a new process resumes to 2 x RUN_STEPS
export SOMOE_CACHE="$OUT/cache"
for preset in seed000_gpt2 seed000_some; do
  run=(--preset $preset --out "$OUT/run_$preset" --no-progress data.source=builtin train.device=$DEV
       train.compile=step train.compile_backend=$BACKEND train.eval_every=0 train.eval_batches=$EVAL_BATCHES
       train.log_every=$LOG_EVERY train.ckpt_every=0 "${RUN_MODE[@]}" "${TINY[@]}" "${RUN_DATA[@]}")
  step "run_$preset" 50 $SOMOE train "${run[@]}" train.max_steps=$RUN_STEPS
  step "resume_$preset" 30 $SOMOE train "${run[@]}" train.max_steps=$((2 * RUN_STEPS)) --resume auto
done
python3 - "$OUT" <<'EOF' | tee -a "$LOG"
import json, math, pathlib, sys
out = pathlib.Path(sys.argv[1])
runs = []
for run_dir in sorted(out.glob("run_*")):  # time per 1,000 steps from the resumed process's train records
    records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    cfg = json.loads(json.dumps(__import__("yaml").safe_load((run_dir / "config.yaml").read_text())))
    half = max(r["step"] for r in train) // 2
    late = [r for r in train if r["step"] > half]
    if len(late) < 2:
        continue
    s_per_step = (late[-1]["elapsed"] - late[0]["elapsed"]) / (late[-1]["step"] - late[0]["step"])
    t = cfg["train"]
    # the seed's schedule: 20,000 stories, one per row (data.mode padded), train.epochs passes
    steps_20k = math.ceil(20000 / t["batch_size"]) * t["epochs"]
    runs.append({"run": run_dir.name, "steps": late[-1]["step"], "s_per_1000_steps": 1000 * s_per_step,
                 "tokens_per_s": late[-1]["tok_per_s"], "seed_schedule_steps": steps_20k,
                 "projected_hours": steps_20k * s_per_step / 3600,
                 "val_bpb": [(e["step"], e["val_bpb"]) for e in evals], "resumed": len(evals) >= 2})
(out / "runs.json").write_text(json.dumps({"rows": runs}, indent=1))
for r in runs:
    print("runs", " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))
for name in ("ops", "compile", "gpu_seed000_gpt2", "gpu_seed000_some", "gpu_seed003_nanogpt_moe", "layer"):
    p = out / f"{name}.json"
    try:
        rows = json.loads(p.read_text())["rows"]
    except Exception as err:
        print(f"{name}: no rows ({type(err).__name__})")
        continue
    for r in rows:
        keys = ("impl", "preset", "mode", "path", "dtype", "num_experts", "top_k", "ops", "graph_breaks", "recompiles",
                "compile_s", "ms", "ms_p90", "tokens_per_s", "ratio", "speedup_vs_transformers", "mfu", "peak_mem_gib")
        print(name, " ".join(f"{k}={r[k]:.4g}" if isinstance(r.get(k), float) else f"{k}={r.get(k)}"
                             for k in keys if k in r))
EOF
