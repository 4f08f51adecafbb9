#!/usr/bin/env bash
# bf16 vs fp32 training of one preset on the built-in corpus: the same seed, data and steps,
# both runs side by side at one thread each (2 cores), then the val losses at every eval.
#   bash scripts/bf16_vs_fp32.sh [PRESET] [STEPS] [OUT] [key=value ...]   # default: cpu_some 200 runs/bf16_vs_fp32
#   bash scripts/bf16_vs_fp32.sh cpu_some 200 runs/bf16_seed1338 train.seed=1338   # overrides go to both runs
# bf16 = train.precision=bf16 (autocast, fp32 master weights) and, for SoME presets, bf16 frozen experts.
set -euo pipefail
cd "$(dirname "$0")/.."
PRESET=${1:-cpu_some}
STEPS=${2:-200}
OUT=${3:-runs/bf16_vs_fp32}
shift $(( $# < 3 ? $# : 3 ))
PY=${PY:-.venv/bin/python}
SOMOE="$PY -m somoe"
mkdir -p "$OUT"
common=(train.max_steps="$STEPS" train.eval_every=50 train.eval_batches=8 train.num_threads=1 "$@")
fp32_extra=() bf16_extra=()
ffn=$($PY -c "from somoe.config import load_config; print(load_config(preset='$PRESET').model.ffn)")
if [[ $ffn == some ]]; then  # the frozen experts' storage follows the run's precision (the preset may say bf16)
  fp32_extra=(model.some.expert_dtype=fp32) bf16_extra=(model.some.expert_dtype=bf16)
fi
OMP_NUM_THREADS=1 $SOMOE train --preset "$PRESET" --out "$OUT/fp32" "${common[@]}" train.precision=fp32 \
  "${fp32_extra[@]}" >"$OUT.fp32.log" 2>&1 &
OMP_NUM_THREADS=1 $SOMOE train --preset "$PRESET" --out "$OUT/bf16" "${common[@]}" train.precision=bf16 \
  "${bf16_extra[@]}" >"$OUT.bf16.log" 2>&1 &
wait
python3 - "$OUT" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
val = {p: {r["step"]: r["val_loss"] for r in map(json.loads, (out / p / "metrics.jsonl").open()) if "val_loss" in r}
       for p in ("fp32", "bf16")}
print("step  fp32 val  bf16 val  bf16/fp32 - 1")
for step in sorted(val["fp32"]):
    a, b = val["fp32"][step], val["bf16"].get(step, float("nan"))
    print(f"{step:4d}  {a:8.4f}  {b:8.4f}  {b / a - 1:+.2%}")
PY
