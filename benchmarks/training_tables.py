"""The training comparison's table: each setting, both models, and their paired difference on the same questions.

.venv/bin/python benchmarks/training_tables.py docs/results/training
"""

import json
import sys
from pathlib import Path

from pyramiddrop.tools.evaluate import format_difference
from pyramiddrop.tools.stats import paired_bootstrap_diff


def label(row: dict) -> str:
    settings = row["settings"]
    if row["method"] == "none":
        return "no drop"
    where = f"λ={settings['lam']}" if "lam" in settings else f"budget {settings['budget']}"
    return f"{row['method']} {where} {settings['layer_list']}"


def interval(row: dict) -> str:
    return f"{100 * row['accuracy']:.1f} [{100 * row['ci_low']:.1f}, {100 * row['ci_high']:.1f}]"


if __name__ == "__main__":
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/results/training")
    print("| setting (1000 questions, seed 101) | no-drop-trained | PyramidDrop-trained | difference [95% CI] |")
    print("|---|---|---|---|")
    for plain_path in sorted(folder.glob("no-drop_*.json")):
        drop_rows = json.loads((folder / plain_path.name.replace("no-drop_", "pdrop-trained_")).read_text())
        for plain, dropped in zip(json.loads(plain_path.read_text()), drop_rows):
            if plain_path.name.startswith("no-drop_budget") and plain["method"] == "none":
                continue  # the no-drop row is in the lam file already
            diff, low, high = paired_bootstrap_diff(dropped["correct"], plain["correct"])
            print(
                f"| {label(plain)} | {interval(plain)} | {interval(dropped)} | {format_difference(diff, [low, high])} |"
            )
