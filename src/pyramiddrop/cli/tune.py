"""`pdrop tune`: search the schedule (where to drop, how much to keep) that keeps the model's answers best at a
budget, and save it for `pdrop eval --schedule` and `PyramidDropConfig.from_json`."""

from __future__ import annotations

import argparse
from pathlib import Path

from pyramiddrop.cli.common import UsageError, load, model_depth
from pyramiddrop.cli.data import calibration_examples
from pyramiddrop.cli.numbers import OPEN_FRACTION, POSITIVE, SEED, STAGE_RANGE
from pyramiddrop.methods import PYRAMID, names


def add_parser(commands, parents: list[argparse.ArgumentParser]) -> None:
    tune = commands.add_parser(
        "tune",
        parents=parents,
        help="search the schedule (where to drop, how much) that keeps the model's answers best at a budget",
    )
    tune.add_argument(
        "--data", help="JSONL of {image, question[, answer]} (default: the synthetic validation split, labels unused)"
    )
    tune.add_argument("--limit", type=POSITIVE, help="use the first N examples")
    tune.add_argument(
        "--budget", type=OPEN_FRACTION, required=True, help="average visual tokens per layer as a fraction of N"
    )
    tune.add_argument(
        "--budget-kind", choices=["tokens", "flops"], default="tokens", help="or a fraction of paper-convention FLOPs"
    )
    tune.add_argument("--stages", type=STAGE_RANGE, default=(2, 5), help="stage count or range (default 2-5)")
    tune.add_argument(
        "--objective",
        choices=["loyalty", "agreement", "accuracy"],
        default="loyalty",
        help="loyalty: first-token KL to no drop (default, no labels); agreement: same top-1 token; accuracy",
    )
    tune.add_argument("--trials", type=POSITIVE, default=50)
    tune.add_argument(
        "--method", default="pdrop", choices=names(PYRAMID), help="the scorer on the tuned schedule (default pdrop)"
    )
    tune.add_argument("--seed", type=SEED, default=0, help="seed of the TPE sampler")
    tune.add_argument("--batch-size", type=POSITIVE, default=16)
    tune.add_argument("--out", default="schedule.json", help="the schedule; <name>_trials.json and .png next to it")
    tune.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    folder = Path(args.out).expanduser().parent
    if not folder.is_dir():
        raise UsageError(f"argument --out: the folder {folder} does not exist; create it or write elsewhere")
    import importlib.util

    for module, extra in (("optuna", "tune"), ("matplotlib", "plots")):  # before any work, not after the trials
        if importlib.util.find_spec(module) is None:
            raise UsageError(f"pdrop tune needs {module}: pip install 'pyramiddrop[{extra}]'")
    depth = model_depth(args)
    if args.stages[1] > depth:
        raise UsageError(
            f"argument --stages: {args.stages[0]}-{args.stages[1]} is outside the model's depth; a model with "
            f"{depth} decoder layers has 2 to {depth} stages"
        )
    examples = calibration_examples(args)
    from pyramiddrop.tools.tune import save, tune

    processor, model = load(args)
    try:
        result = tune(
            model,
            processor,
            examples,
            args.budget,
            budget_kind=args.budget_kind,
            stages=tuple(args.stages),
            objective=args.objective,
            trials=args.trials,
            method=args.method,
            seed=args.seed,
            batch_size=args.batch_size,
        )
    except ValueError as error:  # the space's checks: an unreachable budget, a stage range beyond the depth
        flag = next((flag for flag in ("budget", "stages") if str(error).startswith(flag)), None)
        raise UsageError(f"argument --{flag}: {error}" if flag else str(error)) from error
    paths = save(result, args.out)
    best, baseline, settings = result.best, result.baseline, result.settings
    source = "the paper's schedule" if best["trial"] == "paper" else f"trial {best['trial']}"
    print(
        f"best ({source}): "
        f"layer_list {best['layer_list']}, kept {best['kept']} of {settings['num_visual_tokens']} visual tokens, "
        f"{args.objective} {best['objective']:.4g}"
        + (f" (the paper's schedule: {baseline['objective']:.4g})" if baseline else "")
    )
    print(
        f"{settings['trials']} trials ({settings['unique_schedules']} distinct schedules) on "
        f"{settings['calibration_examples']} examples in {settings['seconds']:.0f} s; wrote {', '.join(map(str, paths))}"
    )
