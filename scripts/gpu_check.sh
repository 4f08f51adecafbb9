#!/usr/bin/env bash
# Issue 5's GPU checks in one call on a lent GPU machine (PyTorch + CUDA, transformers; no install):
# correctness first (the CUDA tests, scripts/gpu_validate.py), then `somoe bench` on CUDA (eager and
# compiled training steps against seed000_gpt2, the layer at the issue's two shapes and where its step
# waits (scripts/layer_profile.py: host or device), generation), then a short end-to-end `somoe train`
# with `train.compile=true`. Each step has its own time limit so that
# a slow or failing step costs only its share; results land in $OUT (default /tmp/somoe-gpu):
# gpu.log, validate.json, layer.json, train.json, train_compiled.json, generate.json.
#   bash scripts/gpu_check.sh            # ~6-9 minutes on an H100 (limits sum to 570 s)
# The training benches take seed000_gpt2 as their reference (--reference), so neither builds nor
# compiles the CPU-sized cpu_gpt2: the first session's compiled bench compiled five models and ran
# out of its 130 s slot.
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
step tests 30 python3 -m pytest -q -p no:cacheprovider tests/models/test_dispatch_fast.py tests/models/test_dispatch.py
step validate 80 python3 scripts/gpu_validate.py --json "$OUT/validate.json"
GPU_PRESETS=(--presets seed000_gpt2,seed000_some --reference seed000_gpt2 --dtypes bf16 --reps 10 --json)
step train.json 60 $SOMOE bench train --device cuda "${GPU_PRESETS[@]}"
step train_compiled.json 130 $SOMOE bench train --device cuda "${GPU_PRESETS[@]}" --compile
step layer.json 40 $SOMOE bench layer --device cuda --grid 64:4,128:8 --dtypes bf16 --reps 20 --json
step layer_profile 20 python3 scripts/layer_profile.py --device cuda --reps 10
step generate.json 60 $SOMOE bench generate --device cuda --preset seed000_gpt2 --dtypes bf16 --reps 3 \
  --new-tokens 32 --json
step compile_profile 60 python3 scripts/compile_profile.py --preset seed000_gpt2
step e2e 90 $SOMOE train --preset seed000_some --out /tmp/e2e data.source=builtin train.compile=true \
  train.max_steps=40 train.eval_every=40 train.eval_batches=2 --no-progress
python3 - "$OUT" <<'EOF' | tee -a "$LOG"
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
for name in ("train", "train_compiled", "layer", "generate"):
    p = out / f"{name}.json"
    try:
        rows = json.loads(p.read_text())["rows"]
    except Exception as err:
        print(f"{name}: no rows ({type(err).__name__})")
        continue
    for r in rows:
        keys = ("impl", "dtype", "num_experts", "top_k", "ms", "tokens_per_s", "ratio", "speedup_vs_transformers", "mfu")
        print(name, " ".join(f"{k}={r[k]:.4g}" if isinstance(r.get(k), float) else f"{k}={r.get(k)}"
                             for k in keys if k in r))
EOF
