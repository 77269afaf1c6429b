#!/usr/bin/env bash
# Issue 5: a model trained without and one trained with PyramidDrop (same recipe, same steps), evaluated on the
# same 500 test questions with no drop and at budgets 1/3 and 0.131 (the closest to 1/9 that 8 layers allow).
# Usage: benchmarks/training_compare.sh NO_DROP_MODEL_DIR PDROP_MODEL_DIR [OUT_DIR]   (default: docs/results/training)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${3:-docs/results/training}
mkdir -p "$out"
for arm in no-drop:"$1" pdrop-trained:"$2"; do
  name=${arm%%:*}
  model=${arm#*:}
  for budget in 0.333 0.131; do
    .venv/bin/pdrop eval --model "$model" --budget "$budget" --methods pdrop --limit 500 --per-type \
      --json "$out/${name}_budget_$budget.json"
  done
done
