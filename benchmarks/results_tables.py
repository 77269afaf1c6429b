"""Markdown tables for docs/results.md from the JSON that benchmarks/results.sh writes.

.venv/bin/python benchmarks/results_tables.py docs/results
"""

import json
import sys
from pathlib import Path

from pyramiddrop.tools.evaluate import format_difference


def label(row: dict) -> str:
    settings = row["settings"]
    if row["method"] == "none":
        return "no drop"
    if row["method"] == "noise":
        return "visual tokens replaced by noise"
    ratios = [float(f"{ratio:.3g}") for ratio in settings["image_token_ratio_list"]]
    name = f"pdrop λ={settings['lam']}" if "lam" in settings else row["method"]
    return f"{name} {settings['position_mode']} {settings['layer_list']} {ratios}"


def table(rows: list[dict]) -> str:
    references = [name for name in ("none", "pdrop") if any(row.get(f"diff_vs_{name}_ci") for row in rows)]
    types = list(dict.fromkeys(t for row in rows for t in row.get("accuracy_per_type") or {}))  # the model's scenes
    head = ["setting", "accuracy [95% CI]", *(f"Δ {name} [95% CI]" for name in references), *types]
    head += ["vis. tokens/layer", "e2e FLOPs"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [label(row), f"{100 * row['accuracy']:.1f} [{100 * row['ci_low']:.1f}, {100 * row['ci_high']:.1f}]"]
        cells += [format_difference(row.get(f"diff_vs_{name}"), row.get(f"diff_vs_{name}_ci")) for name in references]
        cells += [f"{100 * row['accuracy_per_type'].get(t, float('nan')):.1f}" for t in types]
        cells += [f"{row['avg_visual_tokens']:.1f}", f"{row['flops_e2e']:.3g}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def study_table(summary: dict) -> str:
    """The depth profile of `pdrop study`: one drop after layer d, loss vs no drop with its interval."""
    lines = ["| drop after layer | keep | accuracy | loss vs no drop, points [95% CI] |", "|---|---|---|---|"]
    for row in summary["profile"]:
        low, high = row["loss_ci"]
        star = "*" if low > 0 or high < 0 else ""
        lines.append(
            f"| {row['depth']} | {row['keep_ratio']} | {100 * row['accuracy']:.1f} | "
            f"{100 * row['loss']:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}]{star} |"
        )
    no_drop = next(row for row in summary["rows"] if row["method"] == "none")
    horizon = summary["horizon"]
    lines.append(
        f"\nno drop {100 * no_drop['accuracy']:.1f} % [{100 * no_drop['ci_low']:.1f}, {100 * no_drop['ci_high']:.1f}];"
        f" horizon layer (keep {horizon['keep_ratio']}): {horizon['layer']}"
    )
    return "\n".join(lines)


def budget_matrix(folder: Path) -> str:
    """Methods x budgets from every `budget_B.json`: accuracy [95% CI], then the paired difference to pdrop."""
    budgets = {float(path.stem.split("_")[1]): json.loads(path.read_text()) for path in folder.glob("budget_*.json")}
    if not budgets:
        return ""
    order = sorted(budgets, reverse=True)
    methods = list(dict.fromkeys(row["method"] for b in order for row in budgets[b] if row["method"] != "none"))
    rows_of = {b: {row["method"]: row for row in budgets[b]} for b in order}
    head = "| method | " + " | ".join(f"{b:g}" for b in order) + " |\n|---|" + "---|" * len(order)
    accuracy, difference = [head], [head]
    for method in methods:
        cells, deltas = [], []
        for b in order:
            row = rows_of[b].get(method)
            cells.append(
                f"{100 * row['accuracy']:.1f} [{100 * row['ci_low']:.1f}, {100 * row['ci_high']:.1f}]" if row else ""
            )
            deltas.append(format_difference(row.get("diff_vs_pdrop"), row.get("diff_vs_pdrop_ci")) if row else "")
        accuracy.append(f"| {method} | " + " | ".join(cells) + " |")
        if method != "pdrop":
            difference.append(f"| {method} | " + " | ".join(deltas) + " |")
    return "Accuracy [95% CI]:\n\n" + "\n".join(accuracy) + "\n\nΔ pdrop [95% CI]:\n\n" + "\n".join(difference)


if __name__ == "__main__":
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/results")
    matrix = budget_matrix(folder)
    if matrix:
        print("\n### Every method at every budget\n")
        print(matrix)
    for path in sorted(folder.rglob("*.json")):
        if path.name in ("follow_ups.json", "conversation_bench.json") or "training" in path.parts:
            continue  # their own tables: benchmarks/follow_ups.py, pdrop bench, benchmarks/training_tables.py
        data = json.loads(path.read_text())
        if isinstance(data, list) and data and "accuracy_per_type" in data[0]:
            print(f"\n### {path.relative_to(folder)} (n = {data[0]['n']})\n")
            print(table(data))
        elif isinstance(data, dict) and "profile" in data:
            print(f"\n### {path.relative_to(folder)} (n = {data.get('n', '?')}, method {data.get('method', '?')})\n")
            print(study_table(data))
