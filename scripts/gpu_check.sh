#!/usr/bin/env bash
# Issue 5's GPU checks in one call on a lent GPU machine (PyTorch + CUDA, transformers; no install):
# correctness first (the CUDA tests, scripts/gpu_validate.py), then `somoe bench` on CUDA, then a
# short end-to-end `somoe train` (eager). Each step has its own time limit so that a
# slow or failing step costs only its share; results land in $OUT (default /tmp/somoe-gpu):
# gpu.log, validate.json, layer.json, train.json, train_compiled.json, generate.json.
#   bash scripts/gpu_check.sh            # ~8-10 minutes on an H100 (limits sum to 595 s)
# On 2026-11-27 (H100) the compiled bench needed more than 130 s (five compilations) and the
# generate bench more than 35 s; the limits below are raised accordingly, untested.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/somoe-gpu}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
LOG="$OUT/gpu.log"
SOMOE="python3 -m somoe"  # the checkout's package on PYTHONPATH, nothing installed

step() {  # step NAME SECONDS CMD...: its stdout to $OUT/NAME.json when NAME ends in .json, else the log
  local name=$1 secs=$2 rc t0=$SECONDS
  shift 2
  echo "== $name (limit ${secs}s)" | tee -a "$LOG"
  if [[ $name == *.json ]]; then
    timeout "$secs" "$@" >"$OUT/$name" 2>>"$LOG"
  else
    timeout "$secs" "$@" >>"$LOG" 2>&1
  fi
  rc=$?
  echo "== $name: rc=$rc in $((SECONDS - t0))s" | tee -a "$LOG"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
} >>"$LOG" 2>&1
step tests 45 python3 -m pytest -q -p no:cacheprovider tests/models/test_dispatch_fast.py tests/models/test_dispatch.py
step validate 100 python3 scripts/gpu_validate.py --json "$OUT/validate.json"
step train.json 80 $SOMOE bench train --device cuda --presets seed000_gpt2,seed000_some --dtypes bf16 --reps 10 --json
step layer.json 60 $SOMOE bench layer --device cuda --reps 20 --json
step generate.json 60 $SOMOE bench generate --device cuda --preset seed000_gpt2 --reps 3 --new-tokens 32 --json
step train_compiled.json 200 $SOMOE bench train --device cuda --presets seed000_gpt2,seed000_some --dtypes bf16 \
  --reps 10 --compile --json
step e2e 50 $SOMOE train --preset seed000_some --out /tmp/e2e data.source=builtin train.max_steps=30 \
  train.eval_every=30 train.eval_batches=2
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
