"""`pdrop eval`: accuracy (with 95% intervals), loyalty to no drop, FLOPs and latency of several drop settings on
the same questions: PyramidDrop at several λ against baselines at its budget, every method at one budget, or
explicit schedules."""

from __future__ import annotations

import argparse
import json

from pyramiddrop.cli.common import UsageError, check_file, check_layers, load, model_depth
from pyramiddrop.cli.data import questions
from pyramiddrop.cli.numbers import FRACTION, LAYER, OPEN_FRACTION, POSITIVE, SEED, STAGES
from pyramiddrop.config import POSITION_MODES, PyramidDropConfig
from pyramiddrop.methods import (
    BEFORE_AND_INSIDE,
    BEFORE_LLM,
    BY_NAME,
    NAMES,
    ONE_DROP,
    SCORER_NAMES,
    config_fields,
    describe,
    names,
)

# Baselines at λ's budget rank on the same pyramid schedule (FastV drops once); pooling needs its own single drop.
# One-drop methods run at the budget with FastV's schedule, VScan with its own, the pre-LLM methods that drop only
# once (VisPruner, the conditional DPP; not DyCoke's TTM, which merges video frames only) at the budget before layer
# 0; the others on the first λ's schedule.
ONE_DROP_NAMES = names(ONE_DROP)
PRE_LLM_ONCE = tuple(
    n for n in names(BEFORE_LLM) if BY_NAME[n].single_drop and not BY_NAME[n].merge and not BY_NAME[n].video_only
)
AT_BUDGET = (*ONE_DROP_NAMES, *names(BEFORE_AND_INSIDE), *PRE_LLM_ONCE)
BASELINES = (
    *AT_BUDGET,
    *(n for n in SCORER_NAMES if n not in ("pdrop", *AT_BUDGET) and not BY_NAME[n].single_drop),
)


def _baseline_list(text: str) -> list[str]:
    if text.strip().lower() in ("", "none"):
        return []
    methods = [name.strip() for name in text.split(",")]
    for name in methods:
        if name not in BASELINES:
            raise argparse.ArgumentTypeError(f"unknown baseline {name!r}; choose from {', '.join(BASELINES)} or 'none'")
    return methods


def add_parser(commands, parents: list[argparse.ArgumentParser]) -> None:
    evaluate = commands.add_parser(
        "eval", parents=parents, help="accuracy, FLOPs and latency with and without dropping"
    )
    evaluate.add_argument(
        "--data",
        help="JSONL of {image, question, answer[, type]} (default: the synthetic test split); without answers "
        "(no line has one) rows report loyalty to no drop only",
    )
    evaluate.add_argument("--limit", type=POSITIVE, help="evaluate the first N questions")
    evaluate.add_argument("--seed", type=SEED, help="generate a fresh synthetic set from this seed")
    evaluate.add_argument("--lam", type=OPEN_FRACTION, nargs="+", default=[0.5, 0.4, 0.3])
    evaluate.add_argument("--stages", type=STAGES, default=4)
    evaluate.add_argument("--position-mode", nargs="+", choices=POSITION_MODES, default=["compact"])
    evaluate.add_argument("--budget", type=OPEN_FRACTION, help="average visual tokens per layer as a fraction of N")
    evaluate.add_argument(
        "--methods",
        type=lambda text: text.split(","),
        default=["pdrop"],
        help="with --budget or --layer-list: comma-separated from " + describe(),
    )
    evaluate.add_argument(
        "--layer-list",
        type=LAYER,
        nargs="+",
        help="an explicit schedule: 1-based layers after which to drop (0: before the first layer)",
    )
    evaluate.add_argument("--ratios", type=FRACTION, nargs="+", help="with --layer-list: kept fraction per later stage")
    evaluate.add_argument("--fastv-layer", type=LAYER, help="a FastV row: one drop after layer K (with --fastv-ratio)")
    evaluate.add_argument("--fastv-ratio", type=FRACTION, help="the kept fraction of the FastV row")
    evaluate.add_argument(
        "--baselines",
        type=_baseline_list,
        default=["fastv", "random"],
        help="without --budget: these methods at the budget of the first --lam (its average visual tokens per "
        f"layer), compared with it; comma-separated from {', '.join(BASELINES)}, or 'none'",
    )
    evaluate.add_argument("--batch-size", type=POSITIVE, default=16)
    evaluate.add_argument("--per-type", action="store_true", help="also print accuracy per question type")
    evaluate.add_argument(
        "--noise-control", action="store_true", help="add a row with the visual tokens replaced by noise (no image)"
    )
    evaluate.add_argument("--json", help="write the rows here")
    evaluate.add_argument(
        "--per-question", metavar="FILE", help="write one JSON line per setting and question (answer, correct, kept)"
    )
    evaluate.add_argument("--schedule", help="also evaluate this saved schedule (pdrop tune's schedule.json)")
    evaluate.set_defaults(run=run, check=check_schedule_flags)


def check_schedule_flags(args: argparse.Namespace) -> None:
    """The schedule flags, at parsing: which go together and which exclude each other."""
    if bool(args.layer_list) != bool(args.ratios):
        raise UsageError("argument --layer-list: --layer-list and --ratios go together (one ratio per drop layer)")
    if (args.fastv_layer is None) != (args.fastv_ratio is None):
        raise UsageError("argument --fastv-layer: --fastv-layer K and --fastv-ratio R go together")
    explicit = bool(args.layer_list) or args.fastv_layer is not None
    if explicit and args.budget is not None:
        raise UsageError(
            "argument --budget: give a budget or an explicit schedule (--layer-list/--fastv-layer), not both"
        )
    unknown = [name for name in args.methods if name not in NAMES]
    if unknown:
        raise UsageError(f"argument --methods: unknown method {unknown[0]!r}; choose from {', '.join(NAMES)}")
    video_only = [name for name in args.methods if BY_NAME[name].video_only]
    if video_only:
        raise UsageError(
            f"argument --methods: {video_only[0]} merges video frames only; pdrop eval's questions have images, "
            "of which it keeps every token"
        )
    if args.layer_list:
        PyramidDropConfig(args.layer_list, args.ratios)  # ValueError naming the bad value, before loading anything
        one_drop = [name for name in args.methods if BY_NAME[name].drops == ONE_DROP]
        if one_drop:
            raise UsageError(
                f"argument --methods: {one_drop[0]} is a schedule (one drop); use --budget, or for fastv "
                "--fastv-layer K --fastv-ratio R"
            )
        for name in args.methods:  # a scorer on this schedule (the pre-LLM methods and pooling name theirs)
            try:
                PyramidDropConfig(args.layer_list, args.ratios, **config_fields(name))
            except ValueError as error:
                raise UsageError(f"argument --methods: {name} on --layer-list {args.layer_list}: {error}") from error
    elif args.budget is None and args.methods != ["pdrop"]:
        raise UsageError(
            "argument --methods: goes with --budget or --layer-list/--ratios (at λ's budget use --baselines)"
        )
    if args.fastv_layer is not None:
        try:
            PyramidDropConfig.fastv(args.fastv_layer, args.fastv_ratio)
        except ValueError as error:
            raise UsageError(f"argument --fastv-layer: {error}") from error
    if args.schedule:
        load_schedule(args.schedule)


def load_schedule(path: str) -> PyramidDropConfig:
    """`--schedule FILE` (a `PyramidDropConfig.to_json` file, as `pdrop tune` writes), checked before loading."""
    check_file("--schedule", path, "a schedule JSON file (pdrop tune --out writes one)")
    try:
        return PyramidDropConfig.from_json(path)
    except (ValueError, TypeError) as error:
        raise UsageError(f"argument --schedule: {error}") from error


def _resolve(flag: str, num_layers: int, num_visual: int | None = None, extra: dict | None = None, **request):
    """One row, resolved as the harnesses resolve theirs (`DropRequest.resolve`); `extra` replaces its notes."""
    from pyramiddrop.settings import DropRequest

    try:
        setting = DropRequest(**request).resolve(num_layers, num_visual)
    except ValueError as error:
        raise UsageError(f"argument {flag}: {error}") from error
    if extra is not None:
        setting.extra = extra
    return setting


def eval_settings(args: argparse.Namespace, num_layers: int, num_visual: int) -> list:
    """No drop, then PyramidDrop at each λ and position mode, or every method at one matched budget, or the
    explicit schedules; `--schedule` adds its row."""
    from pyramiddrop.settings import Setting
    from pyramiddrop.tools.evaluate import NOISE

    settings = [Setting("none", None)]
    if args.noise_control:
        settings.append(Setting(NOISE, None, {"visual_tokens": "gaussian noise"}))
    saved = []
    if args.schedule:
        config = load_schedule(args.schedule)
        try:
            config.validate_for(num_layers)
        except ValueError as error:
            raise UsageError(f"argument --schedule: {args.schedule}: {error}") from error
        saved = [Setting("schedule", config, {"schedule": args.schedule})]
    explicit = {"schedule": "explicit"}
    if args.layer_list or args.fastv_layer is not None or (saved and args.budget is None):
        for position_mode in args.position_mode if args.layer_list else ():
            for method in args.methods:
                fixed = "position_mode" in config_fields(method)
                overrides = {} if fixed else {"position_mode": position_mode}
                request = dict(method=method, layer_list=args.layer_list, ratios=args.ratios, overrides=overrides)
                settings.append(_resolve("--layer-list", num_layers, extra=explicit, **request))
        if args.fastv_layer is not None:
            request = dict(method="fastv", layer_list=[args.fastv_layer], ratios=[args.fastv_ratio])
            settings.append(_resolve("--fastv-layer", num_layers, extra=explicit, **request))
        return settings + saved
    if args.budget is not None:
        for method in args.methods:
            settings.append(_resolve("--budget", num_layers, num_visual, method=method, budget=args.budget))
        return settings + saved
    for position_mode in args.position_mode:
        for lam in args.lam:
            request = dict(method="pdrop", lam=lam, stages=args.stages, overrides={"position_mode": position_mode})
            settings.append(_resolve("--stages", num_layers, extra={"lam": lam}, **request))
    if args.baselines:  # at the budget of the first PyramidDrop row, which the paired differences compare with
        from pyramiddrop.budget import average_visual_fraction

        first = settings[-len(args.lam) * len(args.position_mode)].config
        budget = average_visual_fraction(first, num_layers, num_visual)
        matched = {"budget": round(budget, 4), "matched_to_lam": args.lam[0]}
        for method in args.baselines:
            if method in AT_BUDGET:
                request = dict(method=method, budget=budget)
            else:  # the same pyramid schedule, ranked by another scorer
                overrides = {"position_mode": first.position_mode}
                request = dict(method=method, layer_list=first.layer_list, ratios=first.image_token_ratio_list)
                request["overrides"] = overrides
            settings.append(_resolve("--baselines", num_layers, num_visual, extra=matched, **request))
    return settings


def _write_per_question(path: str, examples: list[dict], rows: list[dict], answers: dict) -> None:
    """One JSON line per (setting, question): what it answered, whether right, what it kept."""
    from pyramiddrop.tools.answers import normalize_answer

    reference = answers[0] if rows[0]["method"] == "none" else None
    with open(path, "w") as handle:
        for index, row in enumerate(rows):
            for number, example in enumerate(examples):
                record = {
                    "question_index": number,
                    "question": example["question"],
                    "type": example.get("type", "all"),
                    "method": row["method"],
                    "settings": row["settings"],
                    "answer": answers[index][number],
                    "reference": normalize_answer(example["answer"]) if "answer" in example else None,
                    "correct": bool(row["correct"][number]) if row["correct"] is not None else None,
                    "same_as_no_drop": None if reference is None else answers[index][number] == reference[number],
                    "kept_per_stage": row["kept_per_stage"][number],
                }
                handle.write(json.dumps(record) + "\n")
    print(f"wrote {path} ({len(rows) * len(examples)} lines: one per setting and question)")


def _print_per_type(rows: list[dict], examples: list[dict]) -> None:
    types = sorted(rows[0]["accuracy_per_type"])
    counts = {name: sum(example.get("type", "all") == name for example in examples) for name in types}
    print("\naccuracy per question type\n" + f"{'method':<8} {'setting':<26}" + "".join(f"{t:>10}" for t in types))
    print(f"{'questions':<35}" + "".join(f"{counts[t]:>10}" for t in types))
    for row in rows:
        label = str(row["settings"].get("lam", row["settings"].get("budget", "-")))
        label += f" {row['settings'].get('position_mode', '')}"
        print(f"{row['method']:<8} {label:<26}" + "".join(f"{row['accuracy_per_type'][t]:>10.1%}" for t in types))
    print("95% Wilson intervals per type: accuracy_per_type_ci in --json")


def run(args: argparse.Namespace) -> None:
    from pyramiddrop.tools.evaluate import evaluate, format_table
    from pyramiddrop.tools.inputs import build_inputs, count_visual_tokens

    examples = questions(args)
    num_layers = model_depth(args)  # the checks that need the depth, before the weights load
    check_layers("--layer-list", args.layer_list or [], num_layers)
    check_layers("--fastv-layer", [] if args.fastv_layer is None else [args.fastv_layer], num_layers)
    if args.budget is None and not (args.layer_list or args.fastv_layer is not None) and args.stages > num_layers:
        raise UsageError(
            f"argument --stages: {args.stages} stages do not fit a model with {num_layers} decoder layers; give 2 to "
            f"{num_layers}"
        )
    processor, model = load(args)
    probe = build_inputs(processor, [examples[0]["image"]], [examples[0]["question"]])
    settings = eval_settings(args, num_layers, int(count_visual_tokens(model, probe["input_ids"])[0]))
    references = ("none", "pdrop") if args.budget is not None or args.baselines else ("none",)
    rows, answers = evaluate(model, processor, examples, settings, batch_size=args.batch_size, references=references)
    print(format_table(rows))
    if rows[0]["accuracy"] is None:
        print(f"{args.data} has no answers: label-free, each row's loyalty to no drop (loyal, KL) is what it measures")
    if args.per_question:
        _write_per_question(args.per_question, examples, rows, answers)
    if args.per_type and rows[0]["accuracy"] is not None:
        _print_per_type(rows, examples)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=2)
