"""`pdrop`: the command line. `pdrop generate` answers one question about one image with PyramidDrop."""

# Only light modules at the top: torch and transformers are imported inside the commands, so that
# `pdrop --help` and argument errors answer at once (tests/test_cli_newcomer.py checks it).
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from pyramiddrop.config import BUILTIN_METHODS, PyramidDropConfig

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")  # owner/name, as on the Hugging Face hub


class UsageError(Exception):
    """A command-line value that cannot work (a missing file, a model that is nowhere): `main` prints it as one
    line, `pdrop <command>: error: <message>`, with exit status 2; `pdrop --debug` shows the traceback."""


def check_model_name(flag: str, value: str, config_file_ok: bool = False) -> str:
    """`value` as a local model directory (with `config.json`), a `config.json` file (`config_file_ok`) or a hub
    id `owner/name`; anything else is a `UsageError` naming `flag`, before anything is loaded."""
    path = Path(value).expanduser()
    local = "a local model directory" + (" (or its config.json)" if config_file_ok else "")
    todo = f"give {local} or a hub id such as llava-hf/llava-1.5-7b-hf"
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UsageError(
                f"argument {flag}: the directory {value} has no config.json (save_pretrained writes one); {todo}"
            )
        return str(path)
    if path.is_file():
        if config_file_ok:
            return str(path)
        raise UsageError(f"argument {flag}: {value} is a file, not a directory; {todo}")
    if HUB_ID.fullmatch(value) and ".." not in value:
        return value  # whether it exists on the hub is for the hub to say (see `hub_errors`)
    if value.startswith((".", "~")) or "/" in value or os.sep in value:  # a path, not a name
        missing = f"{value} does not exist" if config_file_ok else f"the directory {value} does not exist"
        raise UsageError(f"argument {flag}: {missing}; {todo}")
    raise UsageError(f"argument {flag}: {value!r} is not a directory here and not a hub id (owner/name); {todo}")


@contextlib.contextmanager
def hub_errors(flag: str, name: str) -> Iterator[None]:
    """A hub id that cannot be loaded (unknown, private, offline) as one line naming `flag`; errors from a local
    directory stay what they are."""
    try:
        yield
    except OSError as error:
        if Path(name).exists():
            raise
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UsageError(
            f"argument {flag}: {name} is not a directory here and could not be loaded from the Hugging Face hub "
            f"({reason}); check the id and the connection, or give a local directory"
        ) from error


def check_file(flag: str, value: str, what: str, folder_ok: bool = False) -> None:
    """`value` must be an existing file (or folder, with `folder_ok`); `what` says what to give instead."""
    path = Path(value).expanduser()
    if not path.exists():
        raise UsageError(f"argument {flag}: {value} does not exist; give the path of {what}")
    if path.is_dir() and not folder_ok:
        raise UsageError(f"argument {flag}: {value} is a folder; give the path of {what}")


def open_image_argument(flag: str, value: str, listed_in: str | None = None):
    """The RGB image at `value` (checked to exist), or a one-line `UsageError` naming `flag` (`listed_in`: the
    JSONL file that names the image)."""
    from PIL import Image, UnidentifiedImageError

    subject, todo = value, "give the path of an image file (PNG, JPEG, ...)"
    if listed_in is not None:
        subject = f"the image {value} (named in {listed_in})"
        todo = "give an image file (PNG, JPEG, ...) there; image paths are relative to the JSONL file's folder"
    try:
        with Image.open(Path(value).expanduser()) as image:
            return image.convert("RGB")
    except UnidentifiedImageError as error:
        raise UsageError(f"argument {flag}: {subject} is not an image PIL can read; {todo}") from error
    except OSError as error:  # truncated, unreadable, removed since the check
        raise UsageError(f"argument {flag}: cannot read {subject} ({error}); {todo}") from error


def check_arguments(args: argparse.Namespace) -> None:
    """What can be checked before loading anything: model names, and files that must exist."""
    for flag, config_file_ok in (("model", False), ("config", True)):
        if getattr(args, flag, None) is not None:
            setattr(args, flag, check_model_name(f"--{flag}", getattr(args, flag), config_file_ok))
    if getattr(args, "image", None) is not None:
        check_file("--image", args.image, "an image file (PNG, JPEG, ...)")
    if getattr(args, "video", None) is not None:
        check_file("--video", args.video, "an animated image (GIF, APNG, WebP) or a folder of frames", True)
    if getattr(args, "data", None) is not None:
        check_file("--data", args.data, 'a JSONL file of {"image", "question", "answer"} lines')
    for flag in ("json", "plot", "out") if args.command == "show" else ("json", "plot"):  # files written at the end
        folder = Path(getattr(args, flag, None) or ".").expanduser().parent
        if not folder.is_dir():
            raise UsageError(f"argument --{flag}: the folder {folder} does not exist; create it or write elsewhere")


def default_model(args: argparse.Namespace) -> str:
    """`--model`, or the embedded synthetic LLaVA when it is not given."""
    if args.model is None:
        from pyramiddrop.synthetic.model import require_embedded_model

        args.model = str(require_embedded_model())
    return args.model


def add_drop_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("PyramidDrop schedule (default: 4 stages, lam 0.5)")
    group.add_argument("--layer-list", type=int, nargs="+", help="1-based layers after which to drop, e.g. 8 16 24")
    group.add_argument("--ratios", type=float, nargs="+", help="cumulative kept fraction per later stage")
    group.add_argument("--lam", type=float, help="keep lam**s of the visual tokens in stage s")
    group.add_argument("--stages", type=int, default=4, help="number of stages with --lam (default 4)")
    group.add_argument("--position-mode", choices=["compact", "original"], default="compact")
    group.add_argument("--no-drop", action="store_true", help="run the unmodified model")


def drop_config_from_args(args: argparse.Namespace, num_layers: int) -> PyramidDropConfig | None:
    """The schedule the flags ask for; errors name the flag to change."""
    if args.no_drop:
        return None
    if args.layer_list or args.ratios:
        if args.lam is not None:
            raise SystemExit("pdrop: give either --layer-list/--ratios or --lam, not both.")
        if not (args.layer_list and args.ratios):
            raise SystemExit("pdrop: --layer-list and --ratios go together (one ratio per drop layer).")
        return PyramidDropConfig(args.layer_list, args.ratios, position_mode=args.position_mode)
    lam = 0.5 if args.lam is None else args.lam
    return PyramidDropConfig.from_lambda(num_layers, args.stages, lam, position_mode=args.position_mode)


def load_model(name: str, attn: str | None = None, dtype: str = "float32"):
    """Processor and model through the Auto classes: a hub id or a local directory (offline)."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    with hub_errors("--model", name):
        processor = AutoProcessor.from_pretrained(name)
        model = AutoModelForImageTextToText.from_pretrained(
            name, dtype=getattr(torch, dtype), attn_implementation=attn
        ).eval()
    return processor, model


def build_inputs(processor, images: list, prompts: list[str]) -> dict:
    """Chat-template prompts with one image each, left-padded as `generate()` expects."""
    texts = []
    for prompt in prompts:
        if getattr(processor, "chat_template", None):
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
            texts.append(processor.apply_chat_template(messages, add_generation_prompt=True))
        else:
            texts.append(f"USER: <image>\n{prompt} ASSISTANT:")
    processor.tokenizer.padding_side = "left"
    return dict(processor(images=images, text=texts, return_tensors="pt", padding=True))


def build_video_inputs(processor, frames: list, prompt: str) -> dict:
    """A chat-template prompt with one video (its frames as PIL images), through the processor's video path."""
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": prompt}]}]
    try:
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = dict(processor(videos=[frames], text=[text], return_tensors="pt"))
    except ImportError as error:  # transformers' video processors are written on torchvision
        raise SystemExit(
            f"pdrop show --video: this processor's video path needs a package that is missing ({error}). "
            "Install torchvision matching your torch, or draw an image with --image."
        ) from error
    if "pixel_values_videos" not in inputs:  # e.g. LlavaProcessor ignores videos without a word
        raise SystemExit(
            f"pdrop show --video: {type(processor).__name__} takes no videos; use a video model (Qwen2-VL, "
            "Qwen2.5-VL, Qwen3-VL, LLaVA-OneVision) or draw an image with --image."
        )
    return inputs


def cmd_generate(args: argparse.Namespace) -> None:
    image = open_image_argument("--image", args.image)  # before torch: a wrong file is said at once
    import torch

    from pyramiddrop.api import apply_pyramid_drop, get_drop_record
    from pyramiddrop.flops import paper_flops, prefill_flops

    processor, model = load_model(default_model(args), args.attn, args.dtype)
    text_config = model.config.get_text_config()
    config = drop_config_from_args(args, text_config.num_hidden_layers)
    if config is not None:
        apply_pyramid_drop(model, dataclasses.replace(config, conversation=args.conversation))
    inputs = build_inputs(processor, [image], [args.prompt])
    options = dict(max_new_tokens=args.max_new_tokens, do_sample=False, return_dict_in_generate=True)
    with torch.no_grad():
        output = model.generate(**inputs, **options)
    answer = processor.batch_decode(output.sequences[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0]
    print(f"answer: {answer.strip()}")

    image_token_id = model.config.image_token_id
    num_visual = int((inputs["input_ids"][0] == image_token_id).sum())
    num_text = int(inputs["attention_mask"][0].sum()) - num_visual

    def visual_tokens_per_stage() -> list[int]:
        if config is None:
            return [num_visual]
        return [len(kept) for kept in get_drop_record(model).kept_visual_indices[0]]

    per_stage = visual_tokens_per_stage()
    if config is not None:
        print(f"visual tokens per stage: {' -> '.join(map(str, per_stage))} (drops after layers {config.layer_list})")
    else:
        print(f"visual tokens: {num_visual} (no drop)")
    history = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": args.prompt}]},
        {"role": "assistant", "content": [{"type": "text", "text": answer.strip()}]},
    ]
    follow_ups = []
    for question in args.follow_up:
        ids = torch.cat([output.sequences, _follow_up_ids(processor, history, question, output.sequences)], 1)
        with torch.no_grad():
            cache = getattr(output, "cache", None) or output.past_key_values
            output = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), cache=cache, **options)
        reply = processor.batch_decode(output.sequences[:, ids.shape[1] :], skip_special_tokens=True)[0].strip()
        stages = visual_tokens_per_stage()
        print(f"follow-up: {question}\nanswer: {reply}" + (f" (visual tokens per stage {stages})" if config else ""))
        follow_ups.append({"question": question, "answer": reply, "visual_tokens_per_stage": stages})
        history += [
            {"role": "user", "content": [{"type": "text", "text": question}]},
            {"role": "assistant", "content": [{"type": "text", "text": reply}]},
        ]
    with torch.no_grad():
        start = time.perf_counter()
        model(**inputs, logits_to_keep=1)
        prefill_ms = (time.perf_counter() - start) * 1e3
    shape = (text_config.num_hidden_layers, text_config.hidden_size, text_config.intermediate_size, num_visual)
    paper = paper_flops(*shape, config), paper_flops(*shape)
    e2e = prefill_flops(model.config, num_text, num_visual, config), prefill_flops(model.config, num_text, num_visual)
    print(f"prefill FLOPs (paper convention): {paper[0]:.3e} ({1 - paper[0] / paper[1]:.1%} saved)")
    print(f"prefill FLOPs (end to end):       {e2e[0]:.3e} ({1 - e2e[0] / e2e[1]:.1%} saved)")
    print(f"prefill time: {prefill_ms:.1f} ms")
    if args.json:
        settings = {} if config is None else config.to_dict()
        if config is not None and not args.layer_list:
            settings.update(lam=0.5 if args.lam is None else args.lam, stages=args.stages)
        result = {
            "method": "none" if config is None else config.method,
            "settings": settings,
            "answer": answer.strip(),
            "visual_tokens": num_visual,
            "text_tokens": num_text,
            "visual_tokens_per_stage": per_stage,
            "flops_paper": paper[0],
            "flops_paper_no_drop": paper[1],
            "flops_paper_saved": 1 - paper[0] / paper[1],
            "flops_e2e": e2e[0],
            "flops_e2e_no_drop": e2e[1],
            "flops_e2e_saved": 1 - e2e[0] / e2e[1],
            "prefill_ms": prefill_ms,
            "follow_ups": follow_ups,
            "run": {
                "model": args.model,
                "image": args.image,
                "prompt": args.prompt,
                "follow_up": args.follow_up,
                "conversation": args.conversation,
                "max_new_tokens": args.max_new_tokens,
                "attn": args.attn,
                "dtype": args.dtype,
            },
        }
        Path(args.json).expanduser().write_text(json.dumps(result, indent=2) + "\n")


def _follow_up_ids(processor, history: list[dict], question: str, sequences):
    """The tokens of a new user turn (and the generation prompt) after the conversation so far."""
    import torch

    if not getattr(processor, "chat_template", None):
        raise UsageError("--follow-up needs a processor with a chat template (to write the next turn).")
    before = processor.apply_chat_template(history)
    after = processor.apply_chat_template(
        [*history, {"role": "user", "content": [{"type": "text", "text": question}]}], add_generation_prompt=True
    )
    if not after.startswith(before):
        raise UsageError("--follow-up: this chat template rewrites earlier turns; a cache cannot be continued.")
    tokenizer = processor.tokenizer
    ids = tokenizer(after[len(before) :], add_special_tokens=False, return_tensors="pt").input_ids
    eos = tokenizer.eos_token
    if eos and before.endswith(eos) and int(sequences[0, -1]) != tokenizer.eos_token_id:  # stopped at max tokens
        ids = torch.cat([torch.tensor([[tokenizer.eos_token_id]]), ids], 1)
    return ids


def _baseline_list(text: str) -> list[str]:
    if text.strip().lower() in ("", "none"):
        return []
    # Names only, no torch at parsing; pooling needs its own one-drop schedule (use --budget or --layer-list 0).
    known = ["fastv", *(name for name in BUILTIN_METHODS if name not in ("pdrop", "pool"))]
    methods = [name.strip() for name in text.split(",")]
    for name in methods:
        if name not in known:
            raise argparse.ArgumentTypeError(f"unknown baseline {name!r}; choose from {', '.join(known)} or 'none'")
    return methods


def check_eval_schedule(args: argparse.Namespace) -> None:
    """`pdrop eval`'s schedule flags, at parsing: which go together and which exclude each other."""
    if args.command != "eval":
        return
    if bool(args.layer_list) != bool(args.ratios):
        raise UsageError("argument --layer-list: --layer-list and --ratios go together (one ratio per drop layer)")
    if (args.fastv_layer is None) != (args.fastv_ratio is None):
        raise UsageError("argument --fastv-layer: --fastv-layer K and --fastv-ratio R go together")
    explicit = bool(args.layer_list) or args.fastv_layer is not None
    if explicit and args.budget is not None:
        raise UsageError(
            "argument --budget: give a budget or an explicit schedule (--layer-list/--fastv-layer), not both"
        )
    from pyramiddrop.budget import ALL_METHODS, METHODS

    unknown = [name for name in args.methods if name not in ALL_METHODS]
    if unknown:
        raise UsageError(f"argument --methods: unknown method {unknown[0]!r}; choose from {', '.join(ALL_METHODS)}")
    if args.layer_list:
        PyramidDropConfig(args.layer_list, args.ratios)  # ValueError naming the bad value, before loading anything
        if "fastv" in args.methods:
            raise UsageError("argument --methods: fastv is a schedule (one drop); use --fastv-layer K --fastv-ratio R")
        for name in args.methods:  # a scorer on this schedule (the pre-LLM methods and pooling name theirs)
            try:
                PyramidDropConfig(args.layer_list, args.ratios, **METHODS.get(name, {"method": name}))
            except ValueError as error:
                raise UsageError(f"argument --methods: {name} on --layer-list {args.layer_list}: {error}") from error
    elif args.budget is None and args.methods != ["pdrop"]:
        raise UsageError(
            "argument --methods: goes with --budget or --layer-list/--ratios (at λ's budget use --baselines)"
        )
    if args.fastv_layer is not None:
        PyramidDropConfig([args.fastv_layer], [args.fastv_ratio])
    if args.schedule:
        load_schedule(args.schedule)


def load_schedule(path: str) -> PyramidDropConfig:
    """`--schedule FILE` (a `PyramidDropConfig.to_json` file, as `pdrop tune` writes), checked before loading."""
    check_file("--schedule", path, "a schedule JSON file (pdrop tune --out writes one)")
    try:
        return PyramidDropConfig.from_json(path)
    except (ValueError, TypeError) as error:
        raise UsageError(f"argument --schedule: {error}") from error


def schedule_settings(args: argparse.Namespace, num_layers: int) -> list:
    """The row of `--schedule`: the saved config as it is, named `schedule`."""
    from pyramiddrop.evaluate import Setting

    if not args.schedule:
        return []
    config = load_schedule(args.schedule)
    try:
        config.validate_for(num_layers)
    except ValueError as error:
        raise UsageError(f"argument --schedule: {args.schedule}: {error}") from error
    return [Setting("schedule", config, {"schedule": args.schedule})]


def explicit_settings(args: argparse.Namespace, num_layers: int) -> list:
    """One row per method and position mode on `--layer-list/--ratios`, and one FastV row on `--fastv-*`."""
    from dataclasses import replace

    from pyramiddrop.budget import METHODS
    from pyramiddrop.evaluate import Setting

    settings = []
    if args.layer_list:
        for position_mode in args.position_mode:
            base = PyramidDropConfig(args.layer_list, args.ratios, position_mode=position_mode)
            for method in args.methods:
                config = replace(base, **METHODS.get(method, {"method": method}))
                config.validate_for(num_layers)
                settings.append(Setting(method, config, {"schedule": "explicit"}))
    if args.fastv_layer is not None:
        config = PyramidDropConfig([args.fastv_layer], [args.fastv_ratio], position_mode="original")
        config.validate_for(num_layers)
        settings.append(Setting("fastv", config, {"schedule": "explicit"}))
    return settings


def eval_settings(args: argparse.Namespace, num_layers: int, num_visual_tokens: int) -> list:
    """No drop, then PyramidDrop at each λ and position mode, or every method at one matched budget."""
    from pyramiddrop.budget import schedule_for
    from pyramiddrop.evaluate import NOISE, Setting

    settings = [Setting("none", None)]
    if args.noise_control:
        settings.append(Setting(NOISE, None, {"visual_tokens": "gaussian noise"}))
    saved = schedule_settings(args, num_layers)
    if args.layer_list or args.fastv_layer or (saved and args.budget is None):
        return settings + explicit_settings(args, num_layers) + saved
    if args.budget is not None:
        for method in args.methods:
            config = schedule_for(method, args.budget, num_layers, num_visual_tokens)
            settings.append(Setting(method, config, {"budget": args.budget}))
        return settings + saved
    for position_mode in args.position_mode:
        for lam in args.lam:
            config = PyramidDropConfig.from_lambda(num_layers, args.stages, lam, position_mode=position_mode)
            settings.append(Setting("pdrop", config, {"lam": lam}))
    if args.baselines:  # at the budget of the first PyramidDrop row, which the paired differences compare with
        from dataclasses import replace

        from pyramiddrop.budget import average_visual_fraction, fastv_schedule

        first = settings[-len(args.lam) * len(args.position_mode)]
        budget = average_visual_fraction(first.config, num_layers, num_visual_tokens)
        matched = {"budget": round(budget, 4), "matched_to_lam": args.lam[0]}
        for method in args.baselines:
            if method == "fastv":
                config = fastv_schedule(budget, num_layers, num_visual_tokens)
            else:  # the same pyramid schedule, ranked by another scorer
                config = replace(first.config, method=method)
            settings.append(Setting(method, config, matched))
    return settings


def _model_and_examples(args: argparse.Namespace):
    """The model (default: the embedded one) and the questions (default: the synthetic test split)."""
    from pyramiddrop.evaluate import load_jsonl

    if args.data:
        try:
            examples = load_jsonl(args.data)[: args.limit]
        except ValueError as error:  # a line that is not JSON or lacks a key: it says which
            raise UsageError(f"argument --data: {error}") from error
        if not examples:
            raise UsageError(f"argument --data: {args.data} holds no questions; give one JSON object per line")
    else:
        from pyramiddrop.synthetic.data import generate, make_split

        chosen = make_split("test") if args.seed is None else generate(args.limit or 1000, args.seed)
        chosen = chosen[: args.limit]
        examples = [{"image": e.image(), "question": e.question, "answer": e.answer, "type": e.type} for e in chosen]
    for example in examples:
        if isinstance(example["image"], str):  # resolved against the JSONL file's folder
            example["image"] = open_image_argument("--data", example["image"], args.data)
    processor, model = load_model(default_model(args), args.attn, args.dtype)
    return processor, model, examples


def _write_per_question(path: str, examples: list[dict], rows: list[dict], answers: dict) -> None:
    """One JSON line per (setting, question): what it answered, whether right, what it kept."""
    from pyramiddrop.synthetic.data import normalize_answer

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


def cmd_eval(args: argparse.Namespace) -> None:
    from pyramiddrop.evaluate import evaluate, format_table

    processor, model, examples = _model_and_examples(args)
    probe = build_inputs(processor, [examples[0]["image"]], [examples[0]["question"]])
    num_visual = int((probe["input_ids"] == model.config.image_token_id).sum())
    settings = eval_settings(args, model.config.get_text_config().num_hidden_layers, num_visual)
    references = ("none", "pdrop") if args.budget is not None or args.baselines else ("none",)
    rows, answers = evaluate(
        model, processor, examples, settings, build_inputs, batch_size=args.batch_size, references=references
    )
    print(format_table(rows))
    if rows[0]["accuracy"] is None:
        print(f"{args.data} has no answers: label-free, each row's loyalty to no drop (loyal, KL) is what it measures")
    if args.per_question:
        _write_per_question(args.per_question, examples, rows, answers)
    if args.per_type and rows[0]["accuracy"] is not None:
        types = sorted(rows[0]["accuracy_per_type"])
        counts = {name: sum(example.get("type", "all") == name for example in examples) for name in types}
        print("\naccuracy per question type\n" + f"{'method':<8} {'setting':<26}" + "".join(f"{t:>10}" for t in types))
        print(f"{'questions':<35}" + "".join(f"{counts[t]:>10}" for t in types))
        for row in rows:
            label = str(row["settings"].get("lam", row["settings"].get("budget", "-")))
            label += f" {row['settings'].get('position_mode', '')}"
            print(f"{row['method']:<8} {label:<26}" + "".join(f"{row['accuracy_per_type'][t]:>10.1%}" for t in types))
        print("95% Wilson intervals per type: accuracy_per_type_ci in --json")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=2)


def study_depths(args: argparse.Namespace, num_layers: int) -> list[int]:
    """`--depths` (`--layers`), or 1/8, 1/4, 1/2 and 3/4 of the language model's layers."""
    return args.depths or sorted({max(1, round(num_layers * f)) for f in (0.125, 0.25, 0.5, 0.75)})


def horizon_ratio(args: argparse.Namespace) -> float:
    """`--horizon-ratio`, else 0.1 if studied, else the smallest studied keep ratio."""
    if args.horizon_ratio is not None:
        if args.horizon_ratio not in args.ratios:
            raise SystemExit(f"pdrop study: --horizon-ratio {args.horizon_ratio} is not one of --ratios {args.ratios}.")
        return args.horizon_ratio
    return 0.1 if 0.1 in args.ratios else min(args.ratios)


def cmd_study(args: argparse.Namespace) -> None:
    from pyramiddrop.evaluate import format_difference
    from pyramiddrop.study import (
        attention_concentration,
        depth_profile,
        horizon_layer,
        plot_profile,
        plot_study,
        redundancy_study,
    )

    chosen_ratio = horizon_ratio(args)
    processor, model, examples = _model_and_examples(args)
    depths = study_depths(args, model.config.get_text_config().num_hidden_layers)
    rows = redundancy_study(
        model,
        processor,
        examples,
        depths,
        args.ratios,
        build_inputs,
        args.batch_size,
        method=args.method,
        position_mode=args.position_mode,
        seed=args.drop_seed,
    )
    profile = depth_profile(rows)
    horizons = {ratio: horizon_layer(profile, ratio) for ratio in args.ratios}
    concentration = None
    if args.concentration_samples > 0:
        concentration = attention_concentration(model, processor, examples[: args.concentration_samples], build_inputs)
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
    print(f"wrote {', '.join(map(str, paths))}, {out / 'study.json'}")


def cmd_show(args: argparse.Namespace) -> None:
    if args.no_drop:
        raise SystemExit("pdrop show: there is nothing to show without dropping; remove --no-drop.")
    image = None if args.video else open_image_argument("--image", args.image)
    from PIL import UnidentifiedImageError

    from pyramiddrop.api import apply_pyramid_drop
    from pyramiddrop.evaluate import open_video_frames
    from pyramiddrop.show import show_kept_tokens, show_video_kept_tokens

    if args.video:
        try:
            frames = open_video_frames(args.video, args.frames)
        except UnidentifiedImageError as error:
            raise UsageError(
                f"argument --video: {args.video} holds no frames PIL can read ({error}); give an animated image "
                "(GIF, APNG, WebP) or a folder of frame images"
            ) from error
    processor, model = load_model(default_model(args), args.attn, args.dtype)
    config = drop_config_from_args(args, model.config.get_text_config().num_hidden_layers)
    if args.video:
        config = dataclasses.replace(config, video_pool=args.video_pool)
        inputs = build_video_inputs(processor, frames, args.prompt)
        apply_pyramid_drop(model, config)
        counts = show_video_kept_tokens(model, inputs, frames, args.out)
        print(f"kept tokens per stage and frame: {counts}; wrote {args.out}")
        return
    apply_pyramid_drop(model, config)
    counts = show_kept_tokens(model, processor, image, args.prompt, build_inputs, args.out)
    print(f"kept tokens per stage: {counts}; wrote {args.out}")


def cmd_bench(args: argparse.Namespace) -> None:
    from pyramiddrop import bench

    if args.preset and args.config:
        raise SystemExit("pdrop bench: give --preset or --config, not both.")
    if args.gradient_checkpointing and not args.train:
        raise SystemExit("pdrop bench: --gradient-checkpointing only applies with --train.")
    if args.train and args.plot:
        raise SystemExit("pdrop bench: --plot draws prefill latency; leave it out with --train.")
    if args.config:
        with hub_errors("--config", args.config):
            shape = bench.shape_from_config(args.config, args.visual_tokens or 576, args.text_tokens or 64)
    else:
        shape = bench.PRESETS[args.preset or "cpu-small"]
        overrides = {"visual_tokens": args.visual_tokens, "text_tokens": args.text_tokens}
        shape = bench.Shape(**{**bench.asdict(shape), **{k: v for k, v in overrides.items() if v}})
    if args.conversation:
        _bench_conversation(args, shape)
        return
    rows = bench.run_bench(
        shape,
        args.dtype,
        device=args.device,
        attn=args.attn,
        batch_size=args.batch_size,
        repeats=args.repeats,
        warmup=args.warmup,
        decode_steps=args.decode_steps,
        threads=args.threads,
        train=args.train,
        gradient_checkpointing=args.gradient_checkpointing,
    )
    print(bench.format_table(rows))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=2)
    if args.plot:
        bench.plot(rows, shape, args.plot)


def _bench_conversation(args: argparse.Namespace, shape) -> None:
    import torch

    from pyramiddrop import bench
    from pyramiddrop.bench_conversation import format_conversation, measure_conversation

    if args.train or args.plot:
        raise SystemExit("pdrop bench: --conversation times inference turns; leave out --train and --plot.")
    if any(turns < 2 for turns in args.conversation):
        raise SystemExit("pdrop bench: --conversation takes turn counts of 2 or more (a follow-up needs a first turn).")
    if args.threads:
        torch.set_num_threads(args.threads)
    model = bench.build_model(shape, getattr(torch, args.dtype[0]), args.device)
    model.set_attn_implementation(args.attn)
    config = PyramidDropConfig.from_lambda(shape.num_layers, 4, 0.5)
    prompt = bench._inputs(shape, args.batch_size, args.device)
    rows = [measure_conversation(model, prompt, config, turns, repeats=args.repeats) for turns in args.conversation]
    print(
        f"{shape.num_layers} layers, width {shape.hidden_size}, {shape.visual_tokens} visual tokens, PyramidDrop λ=0.5 "
        f"(4 stages), {args.dtype[0]}, batch {args.batch_size}"
    )
    print(format_conversation(rows))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=2)


def cmd_train(args: argparse.Namespace) -> None:
    from pyramiddrop.synthetic import train

    train.main(["--help"] if args.help_recipe else args.recipe_args)


def stage_range(text: str) -> tuple[int, int]:
    """`--stages 3` or `--stages 2-5`, checked at parsing."""
    from pyramiddrop.tune_space import parse_stage_range

    try:
        return parse_stage_range(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error


def tune_examples(args: argparse.Namespace) -> list[dict]:
    """`--data` (answers optional), or the synthetic validation split; labels only for `--objective accuracy`."""
    if args.data:
        from pyramiddrop.evaluate import load_jsonl

        try:
            examples = load_jsonl(args.data)[: args.limit]
        except ValueError as error:
            raise UsageError(f"argument --data: {error}") from error
        if not examples:
            raise UsageError(f"argument --data: {args.data} holds no examples; give one JSON object per line")
    else:
        from pyramiddrop.synthetic.data import make_split

        examples = [{"image": e.image(), "question": e.question, "answer": e.answer} for e in make_split("validation")][
            : args.limit
        ]
    if args.objective != "accuracy":
        examples = [{key: value for key, value in e.items() if key != "answer"} for e in examples]  # label-free
    elif any("answer" not in e for e in examples):
        missing = sum("answer" not in e for e in examples)
        raise UsageError(
            f"argument --objective: accuracy needs an answer on every line of --data; {missing} of {len(examples)} "
            "have none (use --objective loyalty or agreement, which need no labels)"
        )
    for example in examples:
        if isinstance(example["image"], str):
            example["image"] = open_image_argument("--data", example["image"], args.data)
    return examples


def cmd_tune(args: argparse.Namespace) -> None:
    if not 0.0 < args.budget < 1.0:
        raise UsageError(f"argument --budget: {args.budget} is not a fraction in (0, 1) of no drop's cost")
    if args.trials < 1:
        raise UsageError(f"argument --trials: {args.trials} trials; give at least 1")
    folder = Path(args.out).expanduser().parent
    if not folder.is_dir():
        raise UsageError(f"argument --out: the folder {folder} does not exist; create it or write elsewhere")
    import importlib.util

    for module, extra in (("optuna", "tune"), ("matplotlib", "plots")):  # before any work, not after the trials
        if importlib.util.find_spec(module) is None:
            raise UsageError(f"pdrop tune needs {module}: pip install 'pyramiddrop[{extra}]'")
    examples = tune_examples(args)
    from pyramiddrop.tune import save, tune

    processor, model = load_model(default_model(args), args.attn, args.dtype)
    depth = model.config.get_text_config().num_hidden_layers
    if args.stages[1] > depth or args.stages[0] < 2:
        raise UsageError(
            f"argument --stages: {args.stages[0]}-{args.stages[1]} is outside the model's depth; a model with "
            f"{depth} decoder layers has 2 to {depth} stages"
        )
    try:
        result = tune(
            model,
            processor,
            examples,
            build_inputs,
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


def build_parser() -> argparse.ArgumentParser:
    from pyramiddrop.budget import METHODS as TUNE_METHODS  # light: config and flops only

    parser = argparse.ArgumentParser(prog="pdrop", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    commands = parser.add_subparsers(dest="command", required=True)
    generate = commands.add_parser("generate", help="answer a question about an image")
    generate.add_argument("--model", help="hub id or local directory (default: the embedded synthetic LLaVA)")
    generate.add_argument("--image", required=True)
    generate.add_argument("--prompt", required=True)
    generate.add_argument(
        "--follow-up",
        action="append",
        default=[],
        metavar="TEXT",
        help="a further question about the same image, continuing the cache (repeatable)",
    )
    generate.add_argument(
        "--conversation",
        choices=["keep", "rerank"],
        default="keep",
        help="follow-ups see the first question's kept tokens (keep) or re-rank all of them (rerank)",
    )
    generate.add_argument("--max-new-tokens", type=int, default=32)
    generate.add_argument("--attn", default="sdpa", help="eager, sdpa or flash_attention_2")
    generate.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    generate.add_argument(
        "--json", help="write the answer, visual tokens per stage, FLOPs, prefill time and the settings here"
    )
    add_drop_arguments(generate)
    generate.set_defaults(run=cmd_generate)

    evaluate = commands.add_parser("eval", help="accuracy, FLOPs and latency with and without dropping")
    evaluate.add_argument("--model", help="hub id or local directory (default: the embedded synthetic LLaVA)")
    evaluate.add_argument(
        "--data",
        help="JSONL of {image, question, answer[, type]} (default: the synthetic test split); without answers "
        "(no line has one) rows report loyalty to no drop only",
    )
    evaluate.add_argument("--limit", type=int, help="evaluate the first N questions")
    evaluate.add_argument("--seed", type=int, help="generate a fresh synthetic set from this seed")
    evaluate.add_argument("--lam", type=float, nargs="+", default=[0.5, 0.4, 0.3])
    evaluate.add_argument("--stages", type=int, default=4)
    evaluate.add_argument("--position-mode", nargs="+", choices=["compact", "original"], default=["compact"])
    evaluate.add_argument("--budget", type=float, help="average visual tokens per layer as a fraction of N")
    evaluate.add_argument(
        "--methods",
        type=lambda text: text.split(","),
        default=["pdrop"],
        help="with --budget or --layer-list: comma-separated, e.g. pdrop,fastv,random,uniform,dart,divprune,"
        "visionzip,pool (divprune, visionzip and pool drop before layer 0 under --budget)",
    )
    evaluate.add_argument(
        "--layer-list",
        type=int,
        nargs="+",
        help="an explicit schedule: 1-based layers after which to drop (0: before the first layer)",
    )
    evaluate.add_argument("--ratios", type=float, nargs="+", help="with --layer-list: kept fraction per later stage")
    evaluate.add_argument("--fastv-layer", type=int, help="a FastV row: one drop after layer K (with --fastv-ratio)")
    evaluate.add_argument("--fastv-ratio", type=float, help="the kept fraction of the FastV row")
    evaluate.add_argument(
        "--baselines",
        type=_baseline_list,
        default=["fastv", "random"],
        help="without --budget: these methods at the budget of the first --lam (its average visual tokens per "
        "layer), compared with it; comma-separated from fastv and the registered scorers, or 'none'",
    )
    evaluate.add_argument("--batch-size", type=int, default=16)
    evaluate.add_argument("--attn", default="sdpa")
    evaluate.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    evaluate.add_argument("--per-type", action="store_true", help="also print accuracy per question type")
    evaluate.add_argument(
        "--noise-control", action="store_true", help="add a row with the visual tokens replaced by noise (no image)"
    )
    evaluate.add_argument("--json", help="write the rows here")
    evaluate.add_argument(
        "--per-question", metavar="FILE", help="write one JSON line per setting and question (answer, correct, kept)"
    )
    evaluate.set_defaults(run=cmd_eval)

    evaluate.add_argument("--schedule", help="also evaluate this saved schedule (pdrop tune's schedule.json)")
    tune = commands.add_parser(
        "tune", help="search the schedule (where to drop, how much) that keeps the model's answers best at a budget"
    )
    tune.add_argument("--model", help="hub id or local directory (default: the embedded synthetic LLaVA)")
    tune.add_argument(
        "--data", help="JSONL of {image, question[, answer]} (default: the synthetic validation split, labels unused)"
    )
    tune.add_argument("--limit", type=int, help="use the first N examples")
    tune.add_argument("--budget", type=float, required=True, help="average visual tokens per layer as a fraction of N")
    tune.add_argument(
        "--budget-kind", choices=["tokens", "flops"], default="tokens", help="or a fraction of paper-convention FLOPs"
    )
    tune.add_argument("--stages", type=stage_range, default=(2, 5), help="stage count or range, e.g. 4 or 2-5")
    tune.add_argument(
        "--objective",
        choices=["loyalty", "agreement", "accuracy"],
        default="loyalty",
        help="loyalty: first-token KL to no drop (default, no labels); agreement: same top-1 token; accuracy",
    )
    tune.add_argument("--trials", type=int, default=50)
    tune.add_argument(
        "--method", default="pdrop", choices=list(TUNE_METHODS), help="the scorer on the tuned schedule (default pdrop)"
    )
    tune.add_argument("--seed", type=int, default=0, help="seed of the TPE sampler")
    tune.add_argument("--batch-size", type=int, default=16)
    tune.add_argument("--attn", default="sdpa")
    tune.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    tune.add_argument("--out", default="schedule.json", help="the schedule; <name>_trials.json and .png next to it")
    tune.set_defaults(run=cmd_tune)

    study = commands.add_parser(
        "study",
        help="one drop at several depths: accuracy vs keep ratio (paper Fig. 1), loss per depth, horizon layer",
    )
    study.add_argument("--model")
    study.add_argument("--data")
    study.add_argument("--limit", type=int, default=200)
    study.add_argument("--seed", type=int, help="generate a fresh synthetic set from this seed")
    study.add_argument(
        "--depths",
        "--layers",
        type=int,
        nargs="+",
        help="1-based layers after which the single drop happens (default: 1/8, 1/4, 1/2, 3/4 of depth)",
    )
    study.add_argument("--ratios", type=float, nargs="+", default=[0.75, 0.5, 0.25, 0.1, 0.05])
    study.add_argument(
        "--method", default="pdrop", choices=BUILTIN_METHODS, help="token selection (default: pdrop, attention)"
    )
    study.add_argument("--position-mode", choices=["compact", "original"], default="original")
    study.add_argument("--drop-seed", type=int, default=0, help="seed of stochastic selection (random)")
    study.add_argument(
        "--horizon-ratio", type=float, help="keep ratio of the horizon layer (default: 0.1 if studied, else smallest)"
    )
    study.add_argument("--concentration-samples", type=int, default=32, help="0 skips the attention concentration")
    study.add_argument("--batch-size", type=int, default=16)
    study.add_argument("--attn", default="sdpa")
    study.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    study.add_argument("--out", default="study")
    study.set_defaults(run=cmd_study)

    show = commands.add_parser("show", help="draw the kept visual tokens of each stage over the image or video")
    show.add_argument("--model")
    source = show.add_mutually_exclusive_group(required=True)
    source.add_argument("--image")
    source.add_argument("--video", help="an animated image (GIF, APNG, WebP) or a folder of frame images")
    show.add_argument("--frames", type=int, default=8, help="frames sampled evenly from --video")
    show.add_argument(
        "--video-pool", choices=["sample", "frame"], default="sample", help="rank all frames together or per frame"
    )
    show.add_argument("--prompt", required=True)
    show.add_argument("--out", default="kept_tokens.png")
    show.add_argument("--attn", default="sdpa")
    show.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    add_drop_arguments(show)
    show.set_defaults(run=cmd_show)

    bench = commands.add_parser("bench", help="prefill/decode latency, KV cache and peak memory vs FLOPs")
    bench.add_argument("--preset", choices=["tiny", "cpu-small", "llava-1.5-7b", "llava-next-7b"])
    bench.add_argument("--config", help="any HF config (hub id or local directory) instead of a preset")
    bench.add_argument("--visual-tokens", type=int)
    bench.add_argument("--text-tokens", type=int)
    bench.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    bench.add_argument("--device", default="cpu")
    bench.add_argument("--attn", default="sdpa")
    bench.add_argument("--batch-size", type=int, default=1)
    bench.add_argument("--repeats", type=int, default=5)
    bench.add_argument("--warmup", type=int, default=2)
    bench.add_argument("--decode-steps", type=int, default=16)
    bench.add_argument("--threads", type=int, help="torch threads per worker (default: torch's choice)")
    bench.add_argument("--train", action="store_true", help="time a training step (forward + backward) instead")
    bench.add_argument("--gradient-checkpointing", action="store_true", help="with --train")
    bench.add_argument(
        "--conversation",
        type=int,
        nargs="+",
        metavar="TURNS",
        help="time follow-up turns of conversations this long (keep, rerank, fresh prefill) instead",
    )
    bench.add_argument("--json", help="write one object per setting here")
    bench.add_argument("--plot", help="write a PNG of latency vs visual tokens here")
    bench.set_defaults(run=cmd_bench)
    train = commands.add_parser(
        "train",
        help="train the embedded synthetic task's model, with or without PyramidDrop (--drop-lam)",
        description="All flags go to the recipe: `pdrop train --help-recipe` lists them.",
    )
    train.add_argument("--help-recipe", action="store_true", help="list the recipe's flags")
    train.set_defaults(run=cmd_train)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "train":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.recipe_args = rest
    try:
        check_arguments(args)
        check_eval_schedule(args)
        args.run(args)
    except (UsageError, ValueError) as error:  # a value to change: one line that says which; --debug: traceback
        if args.debug:
            raise
        parser.exit(2, f"pdrop {args.command}: error: {error}\n")


if __name__ == "__main__":
    main()
