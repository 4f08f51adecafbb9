#!/usr/bin/env bash
# The reference analysis of docs/analysis/: train cpu_some on real TinyStories text,
# draw its knowledge galaxies (somoe analyze) and run ablation C against an out-of-domain book
# (somoe adapt). Rerunnable as is: a finished run is reused, an interrupted one resumes, and a run
# trained under an older cpu_some preset (or other overrides) is retrained from scratch.
#
#   scripts/reference_analysis.sh                       # 960 steps (cpu_some's budget)
#   STEPS=480 scripts/reference_analysis.sh             # shorter
#   scripts/reference_analysis.sh model.some.top_k=4    # extra overrides for the training run
#
# Env: DATA (folder with train.txt, dev.txt), OOD (text file), RUN (run folder), OUT (figures),
# STEPS, SOMOE / PYTHON (the installed CLI and interpreter; default the repo's .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/tinystories}
OOD=${OOD:-../shared/data/ood/sherlock_holmes_adventures.txt}
RUN=${RUN:-runs/reference/cpu_some}
OUT=${OUT:-docs/analysis}
STEPS=${STEPS:-960}
SOMOE=${SOMOE:-.venv/bin/somoe}
PYTHON=${PYTHON:-.venv/bin/python}
NICE="nice -n 5"  # the dev box's CPUs are shared

# keep_last=0 keeps every eval's checkpoint: five points for the key trajectories
OVERRIDES=("data.train_path=$(realpath "$DATA/train.txt")" "data.val_path=$(realpath "$DATA/dev.txt")"
           "train.max_steps=$STEPS" "train.eval_every=$((STEPS / 5))" "train.keep_last=0" "$@")

# 0: trained to the end with this config; 1: another config; 2: unfinished or absent
STATUS=0
"$PYTHON" - "$RUN" "${OVERRIDES[@]}" <<'PY' || STATUS=$?
import sys
from pathlib import Path

from somoe.config import ConfigError, load_config
from somoe.experiments.sweeps import run_status
from somoe.experiments.sweeps.runner import check_same_config

run = Path(sys.argv[1])
try:
    check_same_config(run, load_config(preset="cpu_some", overrides=sys.argv[2:]))
except ConfigError:
    sys.exit(1)
sys.exit(0 if run_status(run)[0] == "done" else 2)
PY
if [ "$STATUS" = 1 ]; then
    echo "$RUN was trained with another config (cpu_some changed?): retraining from scratch"
    rm -rf "$RUN"
fi
if [ "$STATUS" = 0 ]; then
    echo "== $RUN is trained to the end with this config: reusing it"
else
    echo "== train cpu_some ($STEPS steps) -> $RUN"
    $NICE "$SOMOE" train --preset cpu_some --out "$RUN" --resume auto --no-progress "${OVERRIDES[@]}"
fi

echo "== somoe analyze -> $OUT"
$NICE "$SOMOE" analyze "$RUN" --out "$OUT"

echo "== ablation C: somoe adapt --shift-data $OOD -> $OUT/adapt"
$NICE "$SOMOE" adapt "$RUN" --shift-data "$OOD" --out "$OUT/adapt"
