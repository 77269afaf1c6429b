#!/usr/bin/env bash
# The runs behind docs/results.md, on the embedded model (or MODEL=DIR). About 30 min on 2 cores.
# Usage: [MODEL=DIR] benchmarks/results.sh [OUT_DIR]   (default: docs/results)
# Then: .venv/bin/python benchmarks/results_tables.py OUT_DIR  prints the markdown tables.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-docs/results}
pdrop=.venv/bin/pdrop
model_args=()
if [[ -n "${MODEL:-}" ]]; then model_args=(--model "$MODEL"); fi
mkdir -p "$out" docs/img
rm -f "$out"/*.json  # tables are made from whatever JSON is here: no leftovers of an older model

# No drop, noise control, PyramidDrop lam 0.5/0.4/0.3 (4 stages) in both position modes, FastV and random at the
# lam 0.5 budget: the test split (1000) and a fresh set (seed 101, never used in training or the splits; 2000).
$pdrop eval "${model_args[@]}" --position-mode compact original --noise-control --per-type --json "$out/eval_test.json"
$pdrop eval "${model_args[@]}" --seed 101 --limit 2000 --position-mode compact original --noise-control --per-type \
  --json "$out/eval_seed101.json"

# Every method at matched budgets (average visual tokens per layer as a fraction of N = 144), 2000 fresh questions.
# 1/9 cannot be reached on 8 layers (stage 0 alone is 1/8); 0.131 is the closest reachable budget.
# At 1/3 and 0.131 also the methods that select before the first layer (divprune, visionzip) and 2-D pooling
# (a 3x1 kernel keeps exactly 1/3; at 0.131 the nearest kernel, 4x2, keeps 1/8).
methods=pdrop,fastv,random,uniform,dart,pdrop-mean,pdrop-original
for budget in 0.5 0.333 0.222 0.131; do
  extra=""
  if [[ $budget == 0.333 || $budget == 0.131 ]]; then extra=",divprune,visionzip,pool"; fi
  $pdrop eval "${model_args[@]}" --seed 101 --limit 2000 --budget "$budget" \
    --methods "$methods$extra" --per-type --json "$out/budget_$budget.json"
done

# The depth profile (one drop, keep 10 %, original positions) with random selection: test split and seed 101;
# then the redundancy study with the paper's attention ranking (every keep ratio).
$pdrop study "${model_args[@]}" --method random --ratios 0.1 --limit 1000 --concentration-samples 0 --out "$out/study_random"
$pdrop study "${model_args[@]}" --method random --ratios 0.1 --seed 101 --limit 1000 --concentration-samples 0 \
  --out "$out/study_random_seed101"
$pdrop study "${model_args[@]}" --limit 1000 --out "$out/study_pdrop"
cp "$out/study_random/study_profile.png" docs/img/study_profile_random.png
cp "$out/study_pdrop/study_accuracy.png" "$out/study_pdrop/study_concentration.png" docs/img/

# Pictures of the kept tokens: a colour and a count question of the test split.
for index in 0 3; do
  question=$(.venv/bin/python -c "from pyramiddrop.synthetic.data import make_split; print(make_split('test', 5)[$index].question)")
  .venv/bin/python -c "from pyramiddrop.synthetic.data import make_split; make_split('test', 5)[$index].image().save('$out/show_$index.png')"
  echo "show_$index: $question"
  $pdrop show "${model_args[@]}" --image "$out/show_$index.png" --prompt "$question" --out "docs/img/show_$index.png"
done
