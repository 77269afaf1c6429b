"""The questions a command runs on: `--data` (a JSONL file) or a split of the synthetic task, with their images
opened (a file that is no image is a one-line error naming `--data`)."""

from __future__ import annotations

import argparse

from pyramiddrop.cli.common import UsageError, open_image_argument


def _read_jsonl(args: argparse.Namespace, what: str) -> list[dict]:
    from pyramiddrop.tools.inputs import load_jsonl

    try:
        examples = load_jsonl(args.data)[: args.limit]
    except ValueError as error:  # a line that is not JSON or lacks a key: it says which
        raise UsageError(f"argument --data: {error}") from error
    if not examples:
        raise UsageError(f"argument --data: {args.data} holds no {what}; give one JSON object per line")
    return examples


def _open_images(args: argparse.Namespace, examples: list[dict]) -> list[dict]:
    for example in examples:
        if isinstance(example["image"], str):  # resolved against the JSONL file's folder
            example["image"] = open_image_argument("--data", example["image"], args.data)
    return examples


def _synthetic_scenes(args: argparse.Namespace) -> str:
    """The scene set of a synthetic `--model` (its config's `synthetic_scenes`; "shapes" for any other model)."""
    from pyramiddrop.synthetic.model import DEFAULT_SCENES, scenes_of

    return scenes_of(args.model) if getattr(args, "model", None) else DEFAULT_SCENES


def questions(args: argparse.Namespace) -> list[dict]:
    """`--data`, or the synthetic test split of the model's scene set (a fresh set from `--seed`), the first
    `--limit`."""
    if args.data:
        return _open_images(args, _read_jsonl(args, "questions"))
    from pyramiddrop.synthetic.data import generate, make_split

    scenes = _synthetic_scenes(args)
    chosen = (
        make_split("test", scenes=scenes)
        if args.seed is None
        else generate(args.limit or 1000, args.seed, scenes=scenes)
    )
    chosen = chosen[: args.limit]
    return [{"image": e.image(), "question": e.question, "answer": e.answer, "type": e.type} for e in chosen]


def calibration_examples(args: argparse.Namespace) -> list[dict]:
    """`--data` (answers optional), or the synthetic validation split; labels only for `--objective accuracy`."""
    if args.data:
        examples = _read_jsonl(args, "examples")
    else:
        from pyramiddrop.synthetic.data import make_split

        split = make_split("validation", scenes=_synthetic_scenes(args))[: args.limit]
        examples = [{"image": e.image(), "question": e.question, "answer": e.answer} for e in split]
    if args.objective != "accuracy":
        examples = [{key: value for key, value in e.items() if key != "answer"} for e in examples]  # label-free
    elif any("answer" not in e for e in examples):
        missing = sum("answer" not in e for e in examples)
        raise UsageError(
            f"argument --objective: accuracy needs an answer on every line of --data; {missing} of {len(examples)} "
            "have none (use --objective loyalty or agreement, which need no labels)"
        )
    return _open_images(args, examples)
