#!/usr/bin/env bash
# The runs behind docs/results.md (issues 3 and 4): on the embedded model, or on MODEL=DIR until it ships.
# Usage: [MODEL=DIR] benchmarks/results.sh [OUT_DIR]   (default: docs/results)
# Then: .venv/bin/python benchmarks/results_tables.py OUT_DIR  prints the markdown tables.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-docs/results}
pdrop=.venv/bin/pdrop
model_args=()
if [[ -n "${MODEL:-}" ]]; then model_args=(--model "$MODEL"); fi
mkdir -p "$out" docs/img

# Issue 3: no drop, noise control, PyramidDrop lam 0.5/0.4/0.3 (4 stages), both position modes, test split.
$pdrop eval "${model_args[@]}" --position-mode compact original --noise-control --per-type --json "$out/eval_test.json"
# Fresh question sets (seeds never used in training or the fixed splits).
for seed in 101 102 103; do
  $pdrop eval "${model_args[@]}" --seed "$seed" --limit 500 --lam 0.5 --position-mode compact original --per-type \
    --json "$out/eval_seed$seed.json"
done

# Issue 4: every method at matched budgets (average visual tokens per layer as a fraction of N = 144).
# 1/9 cannot be reached on 8 layers (stage 0 alone is 1/8); 0.131 is the closest reachable budget.
for budget in 0.5 0.333 0.222 0.131; do
  $pdrop eval "${model_args[@]}" --budget "$budget" --methods pdrop,fastv,random,uniform,dart,pdrop-mean,pdrop-original \
    --limit 500 --per-type --json "$out/budget_$budget.json"
done

# The redundancy study (paper Fig. 1) and attention concentration.
$pdrop study "${model_args[@]}" --limit 300 --out "$out/study"
cp "$out/study/study_accuracy.png" "$out/study/study_concentration.png" docs/img/

# Pictures of the kept tokens.
.venv/bin/python - "$out" <<'PY'
import sys
from pyramiddrop.synthetic.data import make_split
for index in (0, 2):
    example = make_split("test", 5)[index]
    example.image().save(f"{sys.argv[1]}/show_{index}.png")
    print(f"{sys.argv[1]}/show_{index}.png\t{example.question}\t{example.answer}")
PY
$pdrop show "${model_args[@]}" --image "$out/show_0.png" --prompt "$(.venv/bin/python -c 'from pyramiddrop.synthetic.data import make_split; print(make_split("test", 5)[0].question)')" --out docs/img/show_0.png
$pdrop show "${model_args[@]}" --image "$out/show_2.png" --prompt "$(.venv/bin/python -c 'from pyramiddrop.synthetic.data import make_split; print(make_split("test", 5)[2].question)')" --out docs/img/show_2.png
