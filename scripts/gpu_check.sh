#!/usr/bin/env bash
# Every GPU measurement in one call on a lent GPU machine (its own PyTorch, e.g. torch 2.11 + CUDA 13 on
# Python 3.12; nothing installed: this checkout runs from PYTHONPATH=src). The whole script keeps to BUDGET
# seconds of wall time (default 540): each step runs in its own process under its own limit, cut to what
# is left of the budget, and a step that no longer fits is recorded as skipped. A failure or timeout loses
# that step only. Steps run most valuable first:
#   preflight            imports and APIs this needs (scripts/gpu_preflight.py), one line per missing piece
#   experts, ops         in the background: seed000_some's frozen experts drawn once into OUT/cache/experts
#                        (every later build reads them), and somoe bench ops (CPU counts of the GPU path's ops)
#   tests                the CUDA tests: per-parameter gradients eager / compiled / CUDA graph, buffers after a
#                        step, grouped path vs the per-expert loop, the dispatch with no host sync
#   gpu_PRESET_MODE      somoe bench gpu, one process per preset x mode (seed000_some, seed000_gpt2 with
#                        transformers' GPT2LMHeadModel; their eager rows after the layer; seed003_nanogpt_moe
#                        last): tokens/s, MFU, peak memory. The compiled row of a preset runs first and fills
#                        the shared inductor cache (OUT/cache/inductor) that its CUDA-graph row and its
#                        training run then read
#   layer                somoe bench layer at seed000 width: SoME vs dense vs transformers' MoE block
#   run_/resume_PRESET   seed000_gpt2 and seed000_some trained on the shipped stories (compiled step + CUDA
#                        graph): RUN_STEPS steps, eval, checkpoint, then a resumed process to 2 x RUN_STEPS
#   compile              somoe bench compile on CUDA: the whole step's graph breaks, recompiles, compile time
# Every row streams into OUT/rows.jsonl as its step ends (a status line per step too); the summary at the
# end reads whatever is there (OUT/runs.json: time per 1,000 steps, projected hours of the seed schedule).
#   bash scripts/gpu_check.sh                       # OUT=/tmp/somoe-gpu, PYTHON=python3, BUDGET=540
#   DRY=1 bash scripts/gpu_check.sh                 # the same steps on the CPU at tiny sizes
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/somoe-gpu}
PY=${PYTHON:-python3}
DRY=${DRY:-0}
mkdir -p "$OUT/parts"
ROWS="$OUT/rows.jsonl"
LOG="$OUT/gpu.log"
: >"$ROWS"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# a step past its limit gets SIGABRT, on which Python prints every thread's stack to the log: where it hung
export PYTHONFAULTHANDLER=1
# caches shared by every process of the run (and by a second run into the same OUT)
export TORCHINDUCTOR_CACHE_DIR="$OUT/cache/inductor" TRITON_CACHE_DIR="$OUT/cache/triton"
export TORCHINDUCTOR_FX_GRAPH_CACHE=1 TORCHINDUCTOR_AUTOGRAD_CACHE=1
export SOMOE_EXPERT_CACHE="$OUT/cache/experts" SOMOE_CACHE="$OUT/cache/data"
SOMOE=("$PY" -m somoe)
RESERVE=20  # seconds kept for the summary and for timeout's kill grace

DEV=cuda BACKEND=inductor STEPS=10 TINY=() GRID=128:8 LAYER_SHAPE=(--tokens 8192 --d-model 768 --d-ffn 2304)
LAYER_DTYPES=bf16 MODES=(compiled cudagraphs eager) BUDGET=${BUDGET:-540} PREFLIGHT=()
RUN_STEPS=300 LOG_EVERY=50 EVAL_BATCHES=40 RUN_MODE=(train.cuda_graphs=true train.precision=bf16) RUN_DATA=()
TESTS=(tests/models/test_dispatch_fast.py tests/models/test_grouped_vs_loop.py tests/train/test_step_equivalence.py)
TESTS_K=cuda
if [[ $DRY == 1 ]]; then  # the same steps on the CPU at tiny sizes: checks the script, not the GPU
  DEV=cpu BACKEND=aot_eager STEPS=2 GRID=8:2 LAYER_SHAPE=(--tokens 64 --d-model 32 --d-ffn 16)
  LAYER_DTYPES=fp32 MODES=(compiled eager) BUDGET=${BUDGET_DRY:-1800} PREFLIGHT=(--cpu) TESTS_K=cpu
  export OMP_NUM_THREADS=1  # tiny ops on shared cores: OpenMP hand-offs would dominate (docs/performance-notes.md)
  RUN_STEPS=4 LOG_EVERY=2 EVAL_BATCHES=2 RUN_MODE=(train.precision=fp32)
  RUN_DATA=(model.vocab_size=320 data.builtin_train_stories=100 data.builtin_val_stories=20 data.tokenizer_train_stories=100)
  TINY=(model.d_model=32 model.n_layers=1 model.n_heads=2 model.vocab_size=64 model.max_seq_len=16 data.seq_len=16
        train.batch_size=2 model.d_ffn=64 model.some.num_experts=8 model.some.top_k=5 model.some.d_ffn=16
        model.moe.num_experts=4 model.moe.top_k=2 model.moe.d_ffn=16 "model.some.entropy_band=[1.0,1.5]")
fi

record() {  # record STEP RC SECONDS [NOTE]: the step's status line in rows.jsonl
  printf '{"step": "%s", "rc": %s, "seconds": %s%s}\n' "$1" "$2" "$3" "${4:+, \"note\": \"$4\"}" >>"$ROWS"
}

step() {  # step NAME SECONDS CMD...: CMD in its own process under min(SECONDS, the budget's rest); a NAME
  # ending in .json has its stdout turned into rows (scripts/gpu_summary.py rows), anything else goes to the log
  local name=$1 secs=$2 rc t0=$SECONDS left
  shift 2
  left=$((BUDGET - RESERVE - SECONDS))
  ((secs > left)) && secs=$left
  if ((secs < 10)); then
    echo "== ${name%.json}: skipped, $((BUDGET - SECONDS))s of the budget left" | tee -a "$LOG"
    record "${name%.json}" null 0 "skipped: budget"
    return 0
  fi
  echo "== ${name%.json} (limit ${secs}s, at ${SECONDS}s)" | tee -a "$LOG"
  if [[ $name == *.json ]]; then
    timeout -s ABRT -k 5 "$secs" "$@" >"$OUT/parts/$name" 2>>"$LOG"
    rc=$?
    "$PY" scripts/gpu_summary.py rows "$OUT/parts/$name" "${name%.json}" >>"$ROWS"
  else
    timeout -s ABRT -k 5 "$secs" "$@" >>"$LOG" 2>&1
    rc=$?
  fi
  record "${name%.json}" "$rc" $((SECONDS - t0))
  echo "== ${name%.json}: rc=$rc in $((SECONDS - t0))s" | tee -a "$LOG"
}

{ [[ $DEV == cuda ]] && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
} >>"$LOG" 2>&1
step preflight.json 60 "$PY" scripts/gpu_preflight.py "${PREFLIGHT[@]}"
grep "^preflight:" "$LOG" | tail -n 30

# background, on the CPU: the frozen experts of seed000_some drawn once (each layer in turn, into the cache
# every later build reads), and the op counts
step experts 240 "$PY" -c 'import sys
from somoe.config import load_config
from somoe.models.ffn.some import SoMELayer
cfg = load_config(preset="seed000_some", overrides=sys.argv[1:]).model
for i in range(cfg.n_layers):
    SoMELayer(cfg, i)' "${TINY[@]}" &
EXPERTS=$!
step ops.json 60 "${SOMOE[@]}" bench ops --json &
OPS=$!

step tests 120 "$PY" -m pytest -q -p no:cacheprovider -rs "${TESTS[@]}" -k "$TESTS_K"

wait "$EXPERTS"
gpu_row() {  # gpu_row PRESET MODE SECONDS
  step "gpu_$1_$2.json" "$3" "${SOMOE[@]}" bench gpu --device $DEV --backend $BACKEND --presets "$1" --modes "$2" \
    --steps $STEPS --json "${TINY[@]}"
}
declare -A LIMIT=([compiled]=120 [cudagraphs]=60 [eager]=45)
# the targets' figures first (the fastest modes' MFU, the layer's ratios), then the eager rows
for preset in seed000_some seed000_gpt2; do
  for mode in "${MODES[@]}"; do
    [[ $mode != eager ]] && gpu_row $preset "$mode" "${LIMIT[$mode]}"
  done
done
step layer.json 45 "${SOMOE[@]}" bench layer --device $DEV --grid $GRID --dtypes $LAYER_DTYPES --reps 10 \
  "${LAYER_SHAPE[@]}" --json
for preset in seed000_some seed000_gpt2; do
  gpu_row $preset eager "${LIMIT[eager]}"
done
# full-size runs: RUN_STEPS steps with an eval and a checkpoint, then a new process resumes to 2 x RUN_STEPS
for preset in seed000_gpt2 seed000_some; do
  run=(--preset $preset --out "$OUT/run_$preset" --no-progress data.source=builtin train.device=$DEV
       train.compile=step train.compile_backend=$BACKEND train.eval_every=0 train.eval_batches=$EVAL_BATCHES
       train.log_every=$LOG_EVERY train.ckpt_every=0 "${RUN_MODE[@]}" "${TINY[@]}" "${RUN_DATA[@]}")
  rm -rf "$OUT/run_$preset"
  step "run_$preset" 70 "${SOMOE[@]}" train "${run[@]}" train.max_steps=$RUN_STEPS
  step "resume_$preset" 45 "${SOMOE[@]}" train "${run[@]}" train.max_steps=$((2 * RUN_STEPS)) --resume auto
done
step compile.json 60 "${SOMOE[@]}" bench compile --device $DEV --backend $BACKEND --preset seed000_some --steps 4 \
  --json "${TINY[@]}"
for mode in "${MODES[@]}"; do
  gpu_row seed003_nanogpt_moe "$mode" "${LIMIT[$mode]}"
done
wait "$OPS"

"$PY" scripts/gpu_summary.py summary "$OUT" 2>&1 | tee -a "$LOG"
echo "== done in ${SECONDS}s (budget ${BUDGET}s): rows in $ROWS, log in $LOG" | tee -a "$LOG"
