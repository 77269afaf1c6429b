#!/usr/bin/env bash
# The runs behind docs/results.md's "Tuned schedules" section, on the embedded model (or MODEL=DIR).
# Usage: [MODEL=DIR] [FRESH=1] benchmarks/tune_results.sh [OUT_DIR]   (default: docs/results/tune)
# For each budget: `pdrop tune` on the validation split (500 questions, labels unused: the objective is the
# first answer token's KL to no drop), 50 TPE trials; then `pdrop eval` on the test split (1000 questions):
# no drop, the paper's equal-stage schedule at that budget, FastV at that budget (for context) and the tuned schedule. The per-question answers go to
# a scratch folder; benchmarks/tune_tables.py turns both into the paired comparisons (accuracy, loyalty, KL).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-docs/results/tune}
scratch=${SCRATCH:-${TMPDIR:-/tmp}/tune_results}
pdrop=.venv/bin/pdrop
model_args=()
if [[ -n "${MODEL:-}" ]]; then model_args=(--model "$MODEL"); fi
mkdir -p "$out" "$scratch"

for budget in 0.5 0.333 0.222; do
  # Resumable: a budget whose schedule is there is not tuned again (FRESH=1 tunes every budget anew).
  if [[ -n "${FRESH:-}" || ! -e "$out/schedule_$budget.json" ]]; then
    $pdrop tune "${model_args[@]}" --budget "$budget" --stages 2-5 --objective loyalty --trials 50 --seed 0 \
      --out "$out/schedule_$budget.json" | tee "$out/tune_$budget.log"
  fi
  $pdrop eval "${model_args[@]}" --budget "$budget" --methods pdrop,fastv --schedule "$out/schedule_$budget.json" \
    --baselines none --per-type --json "$out/eval_$budget.json" --per-question "$scratch/eval_$budget.jsonl"
done
.venv/bin/python benchmarks/tune_tables.py "$out" "$scratch"
