"""`pdrop study`: one drop at several depths and keep ratios on the same questions (the paper's Fig. 1): accuracy,
the loss against no drop per depth with paired intervals, the horizon layer and the attention concentration."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pyramiddrop.cli.common import UsageError, check_layers, load, model_depth
from pyramiddrop.cli.data import questions
from pyramiddrop.cli.numbers import FRACTION, LAYER, NON_NEGATIVE, POSITIVE, SEED
from pyramiddrop.config import BUILTIN_METHODS, POSITION_MODES, PyramidDropConfig
from pyramiddrop.methods import BEFORE_AND_INSIDE, VIDEO_ONLY_SCORERS, names

# One drop at a depth on image questions: not the methods whose scorer is made for a drop before the LLM and more
# inside it (VScan), nor those that merge video frames only (DyCoke's TTM).
STUDY_METHODS = tuple(
    name for name in BUILTIN_METHODS if name not in names(BEFORE_AND_INSIDE) and name not in VIDEO_ONLY_SCORERS
)


def add_parser(commands, parents: list[argparse.ArgumentParser]) -> None:
    study = commands.add_parser(
        "study",
        parents=parents,
        help="one drop at several depths: accuracy vs keep ratio (paper Fig. 1), loss per depth, horizon layer",
    )
    study.add_argument("--data")
    study.add_argument("--limit", type=POSITIVE, default=200)
    study.add_argument("--seed", type=SEED, help="generate a fresh synthetic set from this seed")
    study.add_argument(
        "--depths",
        "--layers",
        type=LAYER,
        nargs="+",
        help="1-based layers after which the single drop happens (default: 1/8, 1/4, 1/2, 3/4 of depth)",
    )
    study.add_argument("--ratios", type=FRACTION, nargs="+", default=[0.75, 0.5, 0.25, 0.1, 0.05])
    study.add_argument(
        "--method", default="pdrop", choices=STUDY_METHODS, help="token selection (default: pdrop, attention)"
    )
    study.add_argument("--position-mode", choices=POSITION_MODES, default="original")
    study.add_argument("--drop-seed", type=SEED, default=0, help="seed of stochastic selection (random)")
    study.add_argument(
        "--horizon-ratio",
        type=FRACTION,
        help="keep ratio of the horizon layer (default: 0.1 if studied, else smallest)",
    )
    study.add_argument(
        "--concentration-samples", type=NON_NEGATIVE, default=32, help="0 skips the attention concentration"
    )
    study.add_argument("--batch-size", type=POSITIVE, default=16)
    study.add_argument("--out", default="study")
    study.set_defaults(run=run, check=check_method)


def check_method(args: argparse.Namespace) -> None:
    """At parsing: the method must take one drop after a layer d >= 1 (those that drop only before the language
    model, or only at original positions, say so here rather than after loading)."""
    try:
        PyramidDropConfig([1], [0.5], method=args.method, position_mode=args.position_mode)
    except ValueError as error:
        raise UsageError(f"argument --method: {error}") from error


def study_depths(args: argparse.Namespace, num_layers: int) -> list[int]:
    """`--depths` (`--layers`), checked against the depth, or 1/8, 1/4, 1/2 and 3/4 of the model's layers."""
    check_layers("--layers", args.depths or [], num_layers)
    return args.depths or sorted({max(1, round(num_layers * f)) for f in (0.125, 0.25, 0.5, 0.75)})


def horizon_ratio(args: argparse.Namespace) -> float:
    """`--horizon-ratio`, else 0.1 if studied, else the smallest studied keep ratio."""
    if args.horizon_ratio is not None:
        if args.horizon_ratio not in args.ratios:
            raise UsageError(f"argument --horizon-ratio: {args.horizon_ratio} is not one of --ratios {args.ratios}")
        return args.horizon_ratio
    return 0.1 if 0.1 in args.ratios else min(args.ratios)


def _print_table(args, rows, profile, depths, horizons, chosen_ratio, concentration, examples) -> None:
    from pyramiddrop.tools.evaluate import format_difference

    base = rows[0]
    print(
        f"no drop: {base['accuracy']:.1%} [{100 * base['ci_low']:.1f}, {100 * base['ci_high']:.1f}] "
        f"on {len(examples)} questions"
    )
    print(
        f"one drop after layer d (1-based), {args.method} selection, {args.position_mode} positions: accuracy and "
        "loss vs no drop in points, 95% paired-bootstrap interval (* = excludes 0)"
    )
    print((f"{'depth':>5}" + "".join(f"   {'keep ' + format(r, 'g'):<30}" for r in args.ratios)).rstrip())
    cells = {(entry["depth"], entry["keep_ratio"]): entry for entry in profile}
    for depth in depths:
        line = f"{depth:>5}"
        for ratio in args.ratios:
            entry = cells[depth, ratio]
            line += f"   {entry['accuracy']:>6.1%} {format_difference(entry['loss'], entry['loss_ci']):<23}"
        print(line.rstrip())
    horizon = horizons[chosen_ratio]
    if horizon is None:
        print(
            f"horizon layer (keep {chosen_ratio:g}): none; the loss after layer {max(depths)}, the deepest studied, "
            "excludes 0"
        )
    else:
        print(f"horizon layer (keep {chosen_ratio:g}): {horizon} (from it on, every loss interval contains 0)")
    if concentration is not None:
        print("top-10% attention share per layer: " + " ".join(f"{c:.2f}" for c in concentration))


def run(args: argparse.Namespace) -> None:
    from pyramiddrop.tools.study import (
        attention_concentration,
        depth_profile,
        horizon_layer,
        plot_profile,
        plot_study,
        redundancy_study,
    )

    chosen_ratio = horizon_ratio(args)
    depths = study_depths(args, model_depth(args))  # from the model's config, before anything else is loaded
    examples = questions(args)
    processor, model = load(args)
    rows = redundancy_study(
        model,
        processor,
        examples,
        depths,
        args.ratios,
        args.batch_size,
        method=args.method,
        position_mode=args.position_mode,
        seed=args.drop_seed,
    )
    profile = depth_profile(rows)
    horizons = {ratio: horizon_layer(profile, ratio) for ratio in args.ratios}
    concentration = None
    if args.concentration_samples > 0:
        concentration = attention_concentration(model, processor, examples[: args.concentration_samples])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "study_accuracy.png", out / "study_profile.png"]
    plot_study(rows, concentration, str(paths[0]), str(out / "study_concentration.png"), args.method)
    plot_profile(profile, str(paths[1]), args.method)
    if concentration is not None:
        paths.append(out / "study_concentration.png")
    summary = {
        "method": args.method,
        "position_mode": args.position_mode,
        "n": len(examples),
        "depths": depths,
        "ratios": args.ratios,
        "profile": profile,
        "horizon": {"keep_ratio": chosen_ratio, "layer": horizons[chosen_ratio]},
        "horizon_per_ratio": [{"keep_ratio": ratio, "layer": layer} for ratio, layer in horizons.items()],
        "rows": rows,
        "concentration": concentration,
    }
    (out / "study.json").write_text(json.dumps(summary, indent=2))
    _print_table(args, rows, profile, depths, horizons, chosen_ratio, concentration, examples)
    print(f"wrote {', '.join(map(str, paths))}, {out / 'study.json'}")
