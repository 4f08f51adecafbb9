#!/usr/bin/env bash
# cpu_some in bf16 with its router in fp32 (router_dtype=fp32, the default) and under the autocast
# (router_dtype=autocast): the same seed, data and steps, side by side at one thread each, one pair per
# seed, then each run's val losses and the means over the seeds.
#   bash scripts/router_dtype_seeds.sh [STEPS] [OUT] [SEED ...]   # default: 200 runs/router_dtype 1337..1344
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${1:-200}
OUT=${2:-runs/router_dtype}
shift $(( $# < 2 ? $# : 2 ))
SEEDS=("$@")
[[ ${#SEEDS[@]} -gt 0 ]] || SEEDS=(1337 1338 1339 1340 1341 1342 1343 1344)
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT"
for seed in "${SEEDS[@]}"; do
  for rd in fp32 autocast; do
    OMP_NUM_THREADS=1 $PY -m somoe train --preset cpu_some --out "$OUT/$rd-$seed" train.max_steps="$STEPS" \
      train.eval_every=50 train.eval_batches=8 train.num_threads=1 train.precision=bf16 train.seed="$seed" \
      model.some.router_dtype="$rd" --no-progress >"$OUT/$rd-$seed.log" 2>&1 &
  done
  wait
done
$PY - "$OUT" "${SEEDS[@]}" <<'PY'
import json, pathlib, statistics, sys
out, seeds = pathlib.Path(sys.argv[1]), sys.argv[2:]
def run(rd, seed):
    rows = map(json.loads, (out / f"{rd}-{seed}" / "metrics.jsonl").open())
    return {r["step"]: r for r in rows if "val_loss" in r}
val = {(rd, s): run(rd, s) for rd in ("fp32", "autocast") for s in seeds}
steps = sorted(val[("fp32", seeds[0])])
def tokens_per_s(rd, seed):
    line = [l for l in (out / f"{rd}-{seed}.log").read_text().splitlines() if "throughput:" in l][-1]
    return float(line.split("throughput:")[1].split()[0].replace(",", ""))
print("seed  step  fp32 router  autocast router  diff")
for s in seeds:
    for step in steps:
        a, b = val[("fp32", s)][step], val[("autocast", s)][step]
        print(f"{s}  {step:4d}  {a['val_loss']:11.4f}  {b['val_loss']:15.4f}  {b['val_loss'] / a['val_loss'] - 1:+.1%}")
    print(f"{s}  tokens/s: fp32 router {tokens_per_s('fp32', s):,.0f}, autocast router {tokens_per_s('autocast', s):,.0f}")
print("mean over seeds:")
for step in steps:
    a = statistics.mean(val[("fp32", s)][step]["val_loss"] for s in seeds)
    b = statistics.mean(val[("autocast", s)][step]["val_loss"] for s in seeds)
    d = [val[("autocast", s)][step]["val_loss"] / val[("fp32", s)][step]["val_loss"] - 1 for s in seeds]
    sd = statistics.stdev(d) if len(d) > 1 else 0.0
    print(f"  step {step:4d}: fp32 router {a:.4f}, autocast router {b:.4f} ({b / a - 1:+.1%}); per-seed sd {sd:.1%}")
PY
