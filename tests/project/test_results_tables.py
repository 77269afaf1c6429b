"""`benchmarks/results_tables.py`: the method x budget tables of docs/results.md come from the budget files as they
are (a method missing at one budget leaves its cell empty; no drop is not a method row; the question types are
the rows' own)."""

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "results_tables.py"


def load_script():
    spec = importlib.util.spec_from_file_location("results_tables", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def row(method, accuracy, diff=None, per_type=None):
    return {
        "method": method,
        "settings": {"layer_list": [2], "image_token_ratio_list": [0.5], "position_mode": "original"},
        "accuracy": accuracy,
        "ci_low": accuracy - 0.01,
        "ci_high": accuracy + 0.01,
        "diff_vs_pdrop": diff,
        "diff_vs_pdrop_ci": None if diff is None else [diff - 0.02, diff + 0.02],
        "accuracy_per_type": per_type or {"reading": accuracy, "tint": accuracy},
        "avg_visual_tokens": 72.0,
        "flops_e2e": 1e8,
        "n": 100,
    }


def test_budget_matrix_is_methods_by_budget_with_paired_differences(tmp_path):
    tables = load_script()
    (tmp_path / "budget_0.5.json").write_text(
        json.dumps([row("none", 0.99), row("pdrop", 0.9), row("fastv", 0.8, -0.1), row("pool", 0.85, -0.05)])
    )
    (tmp_path / "budget_0.333.json").write_text(
        json.dumps([row("none", 0.99), row("pdrop", 0.7), row("fastv", 0.75, 0.05)])
    )
    accuracy, difference = tables.budget_matrix(tmp_path).split("\n\nΔ pdrop [95% CI]:\n\n")
    assert accuracy.splitlines()[2:] == [
        "| method | 0.5 | 0.333 |",
        "|---|---|---|",
        "| pdrop | 90.0 [89.0, 91.0] | 70.0 [69.0, 71.0] |",
        "| fastv | 80.0 [79.0, 81.0] | 75.0 [74.0, 76.0] |",
        "| pool | 85.0 [84.0, 86.0] |  |",
    ]
    assert difference.splitlines() == [
        "| method | 0.5 | 0.333 |",
        "|---|---|---|",
        "| fastv | -10.0 [-12.0, -8.0]* | +5.0 [+3.0, +7.0]* |",
        "| pool | -5.0 [-7.0, -3.0]* |  |",
    ]
    assert tables.budget_matrix(tmp_path / "nothing") == ""
    header = tables.table([row("pdrop", 0.9)]).splitlines()[0]
    assert "| reading | tint |" in header  # the rows' own question types, not the shapes set's
