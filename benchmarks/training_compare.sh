#!/usr/bin/env bash
# A model trained without and one trained with PyramidDrop (same start, same steps), on 1000 fresh questions (seed
# 101): no drop, PyramidDrop lam 0.5 (the training schedule) and 0.3, and PyramidDrop and random selection at
# budgets 1/3 and 0.131 (the closest to 1/9 that 8 layers allow). Then the paired differences between the models:
#   .venv/bin/python benchmarks/training_tables.py OUT_DIR
# Usage: benchmarks/training_compare.sh NO_DROP_MODEL_DIR PDROP_MODEL_DIR [OUT_DIR]   (default: docs/results/training)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${3:-docs/results/training}
mkdir -p "$out"
rm -f "$out"/*.json
for arm in no-drop:"$1" pdrop-trained:"$2"; do
  name=${arm%%:*}
  model=${arm#*:}
  .venv/bin/pdrop eval --model "$model" --seed 101 --limit 1000 --lam 0.5 0.3 --baselines none --per-type \
    --json "$out/${name}_lam.json"
  for budget in 0.333 0.131; do
    .venv/bin/pdrop eval --model "$model" --seed 101 --limit 1000 --budget "$budget" --methods pdrop,random --per-type \
      --json "$out/${name}_budget_$budget.json"
  done
done
