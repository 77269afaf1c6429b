#!/usr/bin/env bash
# Issue 5: a model trained without and one trained with PyramidDrop (same recipe, same steps), evaluated on the
# whole test split with no drop and with PyramidDrop at lam 0.5 (the training schedule), and on the first 500 test
# questions at budgets 1/3 and 0.131 (the closest to 1/9 that 8 layers allow).
# Usage: benchmarks/training_compare.sh NO_DROP_MODEL_DIR PDROP_MODEL_DIR [OUT_DIR]   (default: docs/results/training)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${3:-docs/results/training}
mkdir -p "$out"
for arm in no-drop:"$1" pdrop-trained:"$2"; do
  name=${arm%%:*}
  model=${arm#*:}
  .venv/bin/pdrop eval --model "$model" --lam 0.5 --per-type --json "$out/${name}_test_lam0.5.json"
  for budget in 0.333 0.131; do
    .venv/bin/pdrop eval --model "$model" --budget "$budget" --methods pdrop --limit 500 --per-type \
      --json "$out/${name}_budget_$budget.json"
  done
done
