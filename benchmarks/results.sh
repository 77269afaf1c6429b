#!/usr/bin/env bash
# The runs behind docs/results.md, on the embedded model (or MODEL=DIR). About 35 min alone on 2 cores.
# Resumable: a step whose output is already there is skipped (an interrupted run continues where it stopped);
# FRESH=1 first deletes what an earlier run wrote (a new model: no leftovers of an older one).
# Usage: [MODEL=DIR] [FRESH=1] benchmarks/results.sh [OUT_DIR]   (default: docs/results)
# Then: .venv/bin/python benchmarks/results_tables.py OUT_DIR  prints the markdown tables.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-docs/results}
pdrop=.venv/bin/pdrop
python=.venv/bin/python
model_args=()
if [[ -n "${MODEL:-}" ]]; then model_args=(--model "$MODEL"); fi
mkdir -p "$out" docs/img
if [[ -n "${FRESH:-}" ]]; then rm -rf "$out"/eval_test.json "$out"/eval_seed101.json "$out"/budget_*.json "$out"/study_*; fi
# finished FILE: true when FILE exists (the step that writes it finished: pdrop writes its JSON at the end).
finished() { if [[ -e "$1" ]]; then echo "results.sh: $1 is there, skipped"; return 0; fi; return 1; }

# No drop, noise control, PyramidDrop lam 0.5/0.4/0.3 (4 stages) in both position modes, FastV and random at the
# lam 0.5 budget: the test split (1000) and a fresh set (seed 101, never used in training or the splits; 2000).
finished "$out/eval_test.json" ||
  $pdrop eval "${model_args[@]}" --position-mode compact original --noise-control --per-type --json "$out/eval_test.json"
finished "$out/eval_seed101.json" ||
  $pdrop eval "${model_args[@]}" --seed 101 --limit 2000 --position-mode compact original --noise-control --per-type \
    --json "$out/eval_seed101.json"

# Every method at matched budgets (average visual tokens per layer as a fraction of N), 2000 fresh questions, all
# in one file per budget so that every difference is paired. On 8 layers 1/9 cannot be reached by a drop inside
# the LLM (stage 0 alone is 1/8); 0.131 is the closest reachable budget. `pool` keeps what its nearest kernel
# keeps (its row says how many). `vscan` is not run: it reads vision layers 5 and
# -2 (as its release does) and the embedded tower has 4 (pdrop eval refuses it with that message).
methods=pdrop,pdrop-original,pdrop-mean,random,uniform,fastv,dart,pivot-duplication,sparsevlm,sparsevlm-norecycle
methods+=,divprune,visionzip,vispruner,conditional-dpp,pool
for budget in 0.5 0.333 0.222 0.131; do
  finished "$out/budget_$budget.json" ||
    $pdrop eval "${model_args[@]}" --seed 101 --limit 2000 --budget "$budget" --methods "$methods" --per-type \
      --json "$out/budget_$budget.json"
done

# The depth profile (one drop, keep 10 %, original positions) with random selection: test split and seed 101;
# then the redundancy study with the paper's attention ranking (every keep ratio).
finished "$out/study_random/study.json" ||
  $pdrop study "${model_args[@]}" --method random --ratios 0.1 --limit 1000 --concentration-samples 0 \
    --out "$out/study_random"
finished "$out/study_random_seed101/study.json" ||
  $pdrop study "${model_args[@]}" --method random --ratios 0.1 --seed 101 --limit 1000 --concentration-samples 0 \
    --out "$out/study_random_seed101"
finished "$out/study_pdrop/study.json" || $pdrop study "${model_args[@]}" --limit 1000 --out "$out/study_pdrop"
cp "$out/study_random/study_profile.png" docs/img/study_profile_random.png
cp "$out/study_pdrop/study_accuracy.png" "$out/study_pdrop/study_concentration.png" docs/img/

# Pictures of the kept tokens: two questions of the test split.
scenes=$($python -c "from pyramiddrop.synthetic.model import require_embedded_model, scenes_of; print(scenes_of('${MODEL:-}' or require_embedded_model()))")
for index in 0 3; do
  split="from pyramiddrop.synthetic.data import make_split; example = make_split('test', 5, scenes='$scenes')[$index]"
  question=$($python -c "$split; print(example.question)")
  $python -c "$split; example.image().save('$out/show_$index.png')"
  echo "show_$index: $question"
  $pdrop show "${model_args[@]}" --image "$out/show_$index.png" --prompt "$question" --out "docs/img/show_$index.png"
done
