"""Markdown tables for docs/results.md from the JSON rows that benchmarks/results.sh writes.

.venv/bin/python benchmarks/results_tables.py docs/results
"""

import json
import sys
from pathlib import Path

TYPES = ["color", "count", "exists", "location", "spatial"]


def label(row: dict) -> str:
    settings = row["settings"]
    if row["method"] == "none":
        return "no drop"
    if row["method"] == "noise":
        return "visual tokens replaced by noise"
    text = f"{row['method']} {settings.get('position_mode', '')}"
    if "lam" in settings:
        text = f"pdrop λ={settings['lam']} {settings['position_mode']}"
    ratios = [float(f"{ratio:.3g}") for ratio in settings["image_token_ratio_list"]]
    return f"{text} {settings['layer_list']} {ratios}"


def table(rows: list[dict]) -> str:
    lines = [
        "| setting | accuracy | retention | " + " | ".join(TYPES) + " | vis. tokens/layer | paper FLOPs | e2e FLOPs |",
        "|---|---|---|" + "---|" * len(TYPES) + "---|---|---|",
    ]
    for row in rows:
        per_type = " | ".join(f"{100 * row['accuracy_per_type'].get(t, float('nan')):.1f}" for t in TYPES)
        retention = f"{100 * row['retention']:.1f}%" if row.get("retention") is not None else "-"
        lines.append(
            f"| {label(row)} | {100 * row['accuracy']:.1f} | {retention} | {per_type} | "
            f"{row['avg_visual_tokens']:.1f} | {row['flops_paper']:.3g} | {row['flops_e2e']:.3g} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/results")
    for path in sorted(folder.glob("*.json")):
        rows = json.loads(path.read_text())
        if isinstance(rows, list) and rows and "accuracy_per_type" in rows[0]:
            print(f"\n### {path.name} (n = {rows[0]['n']})\n")
            print(table(rows))
