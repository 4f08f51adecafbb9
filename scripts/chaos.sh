#!/usr/bin/env bash
# Kill -9 a training run at random moments of its training loop (at a random step 1-40 steps past the
# previous kill, plus 0-0.5 s, so also during checkpoint writes), resume it with --resume auto each time,
# and check that it ends bit-identical to an uninterrupted run: every tensor of the final checkpoint and
# every logged train and validation loss. CPU, fp32, the debug preset at 120 steps (about 10 s of
# training per run on an idle core, plus a few seconds of start-up per process).
#
#   bash scripts/chaos.sh [RUNS] [KILLS_PER_RUN] [OUT]      (defaults: 5 runs, 2 kills each, a temp folder)
#
# Prints one line per run and a summary: kills delivered, runs bit-identical to the reference.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-5}
KILLS=${2:-2}
OUT=${3:-$(mktemp -d "${TMPDIR:-/tmp}/somoe-chaos.XXXXXX")}
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$OUT"
ARGS=(--preset debug --no-progress train.max_steps=120 train.ckpt_every=10 train.eval_every=40 train.log_every=1
      train.keep_last=3 train.device=cpu train.precision=fp32 train.num_threads=1 model.dropout=0.1)

echo "reference run -> $OUT/reference"
"$PY" -m somoe.cli train "${ARGS[@]}" --out "$OUT/reference" > "$OUT/reference.log" 2>&1

compare() {  # compare RUN REFERENCE: exit 0 when weights and losses are bit-identical
  "$PY" - "$1" "$2" <<'EOF'
import json, sys
from pathlib import Path
import torch
from safetensors.torch import load_file

def final(run):
    ckpt = sorted(p for p in (Path(run) / "checkpoints").iterdir() if p.name.startswith("step-") and p.is_dir())[-1]
    return ckpt.name, load_file(str(ckpt / "model.safetensors"))

def losses(run):
    rows = [json.loads(l) for l in (Path(run) / "metrics.jsonl").read_text().splitlines() if l.strip()]
    return {(r["kind"], r["step"]): r.get("loss", r.get("val_loss")) for r in rows if r["kind"] in ("train", "eval")}

(name_a, a), (name_b, b) = final(sys.argv[1]), final(sys.argv[2])
same = name_a == name_b and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
same = same and losses(sys.argv[1]) == losses(sys.argv[2])
sys.exit(0 if same else 1)
EOF
}

lines() { if [ -f "$1" ]; then wc -l < "$1"; else echo 0; fi; }

kills=0
identical=0
for i in $(seq 1 "$RUNS"); do
  run="$OUT/run$i"
  delivered=0
  for k in $(seq 1 "$KILLS"); do
    logged=$(lines "$run/metrics.jsonl")
    "$PY" -m somoe.cli train "${ARGS[@]}" --out "$run" --resume auto >> "$OUT/run$i.log" 2>&1 &
    pid=$!
    target=$((logged + 1 + RANDOM % 40))  # metrics.jsonl gets a line per step (and per eval)
    while kill -0 "$pid" 2>/dev/null && [ "$(lines "$run/metrics.jsonl")" -lt "$target" ]; do
      sleep 0.05  # a random step rather than a random time: the same spread on a loaded machine
    done
    sleep "$(awk -v s="$RANDOM" 'BEGIN { srand(s); printf "%.2f", 0.5 * rand() }')"
    kill -9 "$pid" 2>/dev/null || true
    rc=0
    wait "$pid" 2>/dev/null || rc=$?
    if [ "$rc" -eq 137 ]; then  # it was still running: killed mid-training (or mid-save)
      delivered=$((delivered + 1))
    fi
  done
  "$PY" -m somoe.cli train "${ARGS[@]}" --out "$run" --resume auto >> "$OUT/run$i.log" 2>&1
  kills=$((kills + delivered))
  if compare "$run" "$OUT/reference"; then
    identical=$((identical + 1))
    verdict="bit-identical"
  else
    verdict="DIFFERS"
  fi
  resumed=$(grep -o "resumed from .*step-[0-9]*" "$OUT/run$i.log" | sed 's/.*step-0*//' | paste -sd, - || true)
  echo "run $i: $delivered kill(s), resumed at steps ${resumed:-none}, $verdict"
done
echo "chaos: $kills kill -9 delivered over $RUNS runs; $identical/$RUNS runs bit-identical to the uninterrupted one"
[ "$identical" -eq "$RUNS" ]
