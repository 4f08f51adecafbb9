#!/usr/bin/env bash
# Every GPU measurement in one call on a lent GPU machine (PyTorch + CUDA, transformers; no install),
# each step with its own time limit (they sum to <= 570 s) so that a slow or failing step costs only
# its share; results land in $OUT (default /tmp/somoe-gpu) as JSON, the log in gpu.log:
#   tests        the CUDA tests: dispatch paths, compiled and CUDA-graph losses vs eager
#   ops.json     somoe bench ops (CPU counts of the GPU path's ops)
#   compile.json somoe bench compile on CUDA: graph breaks, recompiles, compile time (inductor)
#   gpu_*.json   somoe bench gpu per preset: eager / compiled / compiled + CUDA graphs, tokens/s, MFU,
#                peak memory, step-time spread (+ transformers' GPT2LMHeadModel at seed000_gpt2's size)
#   layer.json   somoe bench layer at seed000 width: SoME vs dense vs transformers' MoE block
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
if [[ ${DRY:-0} == 1 ]]; then  # the same steps on the CPU at tiny sizes: checks the script, not the GPU
  DEV=cpu BACKEND=aot_eager STEPS=2 GRID=8:2 LAYER_SHAPE=(--tokens 64 --d-model 32 --d-ffn 16)
  TINY=(model.d_model=32 model.n_layers=1 model.n_heads=2 model.vocab_size=64 model.max_seq_len=16 data.seq_len=16
        train.batch_size=2 model.d_ffn=64 model.some.num_experts=8 model.some.top_k=5 model.some.d_ffn=16
        model.moe.num_experts=4 model.moe.top_k=2 model.moe.d_ffn=16 "model.some.entropy_band=[1.0,1.5]")
fi
step tests 90 python3 -m pytest -q -p no:cacheprovider tests/models/test_dispatch_fast.py tests/models/test_dispatch.py \
  tests/models/test_compile_fullgraph.py -k "cuda or dispatch"
step ops.json 30 $SOMOE bench ops --json
step compile.json 110 $SOMOE bench compile --device $DEV --backend $BACKEND --preset seed000_gpt2,seed000_some \
  --steps 6 --json "${TINY[@]}"
for preset in seed000_gpt2 seed000_some seed003_nanogpt_moe; do
  modes=eager,compiled,cudagraphs
  [[ $DEV == cpu ]] && modes=eager,compiled
  step "gpu_$preset.json" 100 $SOMOE bench gpu --device $DEV --backend $BACKEND --presets $preset --modes $modes \
    --steps $STEPS --json "${TINY[@]}"
done
step layer.json 40 $SOMOE bench layer --device $DEV --grid $GRID --dtypes bf16 --reps 10 "${LAYER_SHAPE[@]}" --json
python3 - "$OUT" <<'EOF' | tee -a "$LOG"
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
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
