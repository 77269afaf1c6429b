"""The tables and figure of docs/results.md's "Tuned schedules" section, from benchmarks/tune_results.sh's runs.

Usage: .venv/bin/python benchmarks/tune_tables.py OUT_DIR SCRATCH_DIR
  OUT_DIR: schedule_B.json, schedule_B_trials.json and eval_B.json per budget (kept in docs/results/tune);
  SCRATCH_DIR: eval_B.jsonl, `pdrop eval --per-question` (answers per question, not kept).
The paired comparisons of the tuned schedule against the paper's equal-stage schedule at the same budget, on the
test split: accuracy (from `pdrop eval`'s diff_vs_pdrop), answer loyalty (identical to no drop's answer) and the
first answer token's KL to no drop and top-1 agreement, per question (one forward per question here, batches as
`pdrop eval`'s), each with its 95 % paired-bootstrap interval (2000 resamples). Writes OUT_DIR/compare.json and
docs/img/tune_schedules.png; prints markdown.
"""

from __future__ import annotations

import json
import os
import sys
from collections import defaultdict
from pathlib import Path

import torch

from pyramiddrop.budget import schedule_for
from pyramiddrop.config import PyramidDropConfig
from pyramiddrop.flops import tokens_per_layer
from pyramiddrop.synthetic.data import make_split
from pyramiddrop.synthetic.model import require_embedded_model
from pyramiddrop.tools.evaluate import format_difference
from pyramiddrop.tools.inputs import load_model
from pyramiddrop.tools.stats import paired_bootstrap_diff
from pyramiddrop.tools.tune import CalibrationSet

BUDGETS = ("0.5", "0.333", "0.222")
NAMES = {"0.5": "1/2", "0.333": "1/3", "0.222": "2/9"}
ROOT = Path(__file__).resolve().parent.parent


def kept(config: PyramidDropConfig, num_visual: int) -> list[int]:
    return [max(1, int(num_visual * r)) for r in config.image_token_ratio_list]


def schedule_text(config: PyramidDropConfig, num_visual: int) -> str:
    return f"{config.layer_list} keep {kept(config, num_visual)}"


def paired(a, b) -> tuple[float, list[float]]:
    diff, low, high = paired_bootstrap_diff(a, b)
    return diff, [low, high]


def main(out: Path, scratch: Path) -> None:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    processor, model = load_model(os.environ.get("MODEL") or str(require_embedded_model()))
    text = model.config.get_text_config()
    count = json.loads((out / f"eval_{BUDGETS[0]}.json").read_text())[0]["n"]  # the test split, as `pdrop eval`
    examples = [{"image": e.image(), "question": e.question} for e in make_split("test")[:count]]
    test = CalibrationSet(model, processor, examples, batch_size=16)  # `pdrop eval`'s batches
    n_visual, depth = test.num_visual_tokens, text.num_hidden_layers
    summary = {}
    for budget in BUDGETS:
        rows = {row["method"]: row for row in json.loads((out / f"eval_{budget}.json").read_text())}
        history = json.loads((out / f"schedule_{budget}_trials.json").read_text())
        tuned = PyramidDropConfig.from_json(out / f"schedule_{budget}.json")
        paper = schedule_for("pdrop", float(budget), depth, n_visual)
        assert rows["pdrop"]["settings"]["layer_list"] == paper.layer_list
        same = defaultdict(list)
        for line in (scratch / f"eval_{budget}.jsonl").read_text().splitlines():
            record = json.loads(line)
            same[record["method"]].append(int(record["same_as_no_drop"]))
        kl_paper, agree_paper = test.per_example(paper)
        kl_tuned, agree_tuned = test.per_example(tuned)
        assert abs(sum(kl_paper) / len(kl_paper) - rows["pdrop"]["first_token_kl"]) < 1e-3  # the same numbers
        summary[budget] = {
            "paper": {"config": paper.to_dict(), "kept": kept(paper, n_visual)},
            "tuned": {"config": tuned.to_dict(), "kept": kept(tuned, n_visual), "from_trial": history["best"]["trial"]},
            "accuracy": {m: [rows[m]["accuracy"], rows[m]["ci_low"], rows[m]["ci_high"]] for m in rows},
            "accuracy_diff": [rows["schedule"]["diff_vs_pdrop"], rows["schedule"]["diff_vs_pdrop_ci"]],
            "accuracy_mcnemar_p": rows["schedule"]["mcnemar_p_vs_pdrop"],
            "accuracy_diff_vs_fastv": paired(rows["schedule"]["correct"], rows["fastv"]["correct"]),
            "fastv": {"config": rows["fastv"]["settings"], "loyalty": rows["fastv"]["loyalty"]},
            "loyalty": {m: rows[m]["loyalty"] for m in ("pdrop", "schedule")},
            "loyalty_diff": paired(same["schedule"], same["pdrop"]),
            "first_token_kl": {"pdrop": sum(kl_paper) / len(kl_paper), "schedule": sum(kl_tuned) / len(kl_tuned)},
            "first_token_kl_diff": paired(kl_tuned, kl_paper),
            "first_token_agreement": {"pdrop": sum(agree_paper) / count, "schedule": sum(agree_tuned) / count},
            "first_token_agreement_diff": paired(agree_tuned, agree_paper),
            "per_type": {m: rows[m]["accuracy_per_type"] for m in ("none", "pdrop", "schedule")},
            "visual_fraction": {m: rows[m]["avg_visual_tokens"] / n_visual for m in ("pdrop", "schedule")},
            "flops_paper_fraction": {
                m: rows[m]["flops_paper"] / rows["none"]["flops_paper"] for m in ("pdrop", "schedule")
            },
            "tuning": {
                "seconds": history["settings"]["seconds"],
                "trials": history["settings"]["trials"],
                "unique_schedules": history["settings"]["unique_schedules"],
                "calibration_examples": history["settings"]["calibration_examples"],
                "calibration_kl_paper": history["baseline"]["first_token_kl"],
                "calibration_kl_best": history["best"]["first_token_kl"],
            },
            "learned": learned(history),
        }
    (out / "compare.json").write_text(json.dumps(summary, indent=2) + "\n")
    print_tables(summary, n_visual)
    plot(summary, depth, n_visual)


def learned(history: dict) -> dict:
    """Best calibration KL per stage count and per first-drop layer, over the trials."""
    by_stages, by_first = defaultdict(list), defaultdict(list)
    for entry in history["trials"]:
        if entry["trial"] == "paper":
            continue
        by_stages[entry["stages"]].append(entry["first_token_kl"])
        by_first[entry["layer_list"][0]].append(entry["first_token_kl"])

    def summarize(groups: dict) -> dict:
        return {
            k: {"trials": len(v), "best": min(v), "median": sorted(v)[len(v) // 2]} for k, v in sorted(groups.items())
        }

    return {"by_stages": summarize(by_stages), "by_first_drop": summarize(by_first)}


def print_tables(summary: dict, n_visual: int) -> None:
    print(
        "| budget | the paper's schedule | tuned schedule | accuracy paper | accuracy tuned | Δ accuracy [95% CI] | McNemar p |"
    )
    print("|---|---|---|---|---|---|---|")
    for budget, s in summary.items():
        paper, tuned = PyramidDropConfig(**s["paper"]["config"]), PyramidDropConfig(**s["tuned"]["config"])
        accuracy = {m: f"{100 * a:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]" for m, (a, lo, hi) in s["accuracy"].items()}
        print(
            f"| {NAMES[budget]} | {schedule_text(paper, n_visual)} | {schedule_text(tuned, n_visual)} | "
            f"{accuracy['pdrop']} | {accuracy['schedule']} | {format_difference(*s['accuracy_diff'])} | "
            f"{s['accuracy_mcnemar_p']:.3g} |"
        )
    print()
    print("| budget | FastV at the budget | accuracy FastV | tuned - FastV [95% CI] |")
    print("|---|---|---|---|")
    for budget, s in summary.items():
        a, lo, hi = s["accuracy"]["fastv"]
        f = s["fastv"]["config"]
        print(
            f"| {NAMES[budget]} | after layer {f['layer_list'][0]}, keep {f['image_token_ratio_list'][0]:.3f} | "
            f"{100 * a:.1f} [{100 * lo:.1f}, {100 * hi:.1f}] | {format_difference(*s['accuracy_diff_vs_fastv'])} |"
        )
    print()
    print(
        "| budget | loyalty paper | loyalty tuned | Δ loyalty [95% CI] | KL paper | KL tuned | Δ KL [95% CI] | agreement paper | agreement tuned | Δ agreement [95% CI] |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for budget, s in summary.items():
        kl, (kl_diff, kl_ci) = s["first_token_kl"], s["first_token_kl_diff"]
        agree = s["first_token_agreement"]
        star = "*" if kl_ci[0] > 0 or kl_ci[1] < 0 else ""
        print(
            f"| {NAMES[budget]} | {100 * s['loyalty']['pdrop']:.1f} | {100 * s['loyalty']['schedule']:.1f} | "
            f"{format_difference(*s['loyalty_diff'])} | {kl['pdrop']:.3f} | {kl['schedule']:.3f} | "
            f"{kl_diff:+.3f} [{kl_ci[0]:+.3f}, {kl_ci[1]:+.3f}]{star} | {100 * agree['pdrop']:.1f} | "
            f"{100 * agree['schedule']:.1f} | {format_difference(*s['first_token_agreement_diff'])} |"
        )
    print()
    print(
        "| budget | tuning time | trials | distinct schedules | calibration KL, paper's | calibration KL, best | visual tokens/layer paper, tuned | paper FLOPs paper, tuned |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for budget, s in summary.items():
        t, v, f = s["tuning"], s["visual_fraction"], s["flops_paper_fraction"]
        print(
            f"| {NAMES[budget]} | {t['seconds']:.0f} s | {t['trials']} | {t['unique_schedules']} | {t['calibration_kl_paper']:.3f} | "
            f"{t['calibration_kl_best']:.3f} | {v['pdrop']:.3f}, {v['schedule']:.3f} | {f['pdrop']:.3f}, {f['schedule']:.3f} |"
        )
    print()
    print("| budget | best calibration KL by stage count (trials) | by first drop layer (trials) |")
    print("|---|---|---|")
    for budget, s in summary.items():
        stages = ", ".join(f"{k}: {v['best']:.3f} ({v['trials']})" for k, v in s["learned"]["by_stages"].items())
        first = ", ".join(f"{k}: {v['best']:.3f} ({v['trials']})" for k, v in s["learned"]["by_first_drop"].items())
        print(f"| {NAMES[budget]} | {stages} | {first} |")
    print()
    print("accuracy per type (none / paper / tuned):")
    for budget, s in summary.items():
        cells = ", ".join(
            f"{t} {100 * s['per_type']['none'][t]:.1f}/{100 * s['per_type']['pdrop'][t]:.1f}/{100 * s['per_type']['schedule'][t]:.1f}"
            for t in s["per_type"]["none"]
        )
        print(f"  {NAMES[budget]}: {cells}")


def plot(summary: dict, depth: int, n_visual: int) -> None:
    """Visual tokens per layer of the paper's and the tuned schedules, beside the depth profile (docs/img)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    layers = list(range(1, depth + 1))
    for (budget, s), color in zip(summary.items(), ("C0", "C1", "C2")):
        paper, tuned = PyramidDropConfig(**s["paper"]["config"]), PyramidDropConfig(**s["tuned"]["config"])
        left.step(
            layers,
            tokens_per_layer(depth, n_visual, paper),
            where="mid",
            color=color,
            linestyle="--",
            label=f"{NAMES[budget]} paper",
        )
        left.step(
            layers, tokens_per_layer(depth, n_visual, tuned), where="mid", color=color, label=f"{NAMES[budget]} tuned"
        )
    left.set_xlabel("decoder layer (1-based)")
    left.set_ylabel("visual tokens processed")
    left.set_title("schedules: the paper's (dashed) and tuned (solid)")
    left.legend(fontsize=8)
    curves = (("study_random", 0.1, "random, keep 10%"), ("study_pdrop", 0.1, "attention, keep 10%"))
    for name, ratio, label in (*curves, ("study_pdrop", 0.5, "attention, keep 50%")):
        path = ROOT / "docs" / "results" / name / "study.json"
        if not path.exists():
            continue
        profile = [e for e in json.loads(path.read_text())["profile"] if e["keep_ratio"] == ratio]
        depths = [e["depth"] for e in profile]
        loss = [100 * e["loss"] for e in profile]
        errors = [
            [100 * (e["loss"] - e["loss_ci"][0]) for e in profile],
            [100 * (e["loss_ci"][1] - e["loss"]) for e in profile],
        ]
        right.errorbar(depths, loss, yerr=errors, marker="o", capsize=3, label=label)
    right.set_xlabel("one drop after layer")
    right.set_ylabel("accuracy loss vs no drop (points)")
    right.set_title("depth profile (pdrop study, test split)")
    right.set_xlim(0.5, depth + 0.5)
    right.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(ROOT / "docs" / "img" / "tune_schedules.png", dpi=100)
    plt.close(figure)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    main(Path(sys.argv[1]), Path(sys.argv[2]))
