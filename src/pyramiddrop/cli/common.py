"""What every command shares: the one error type, the checks that run before anything is loaded, the options
common to the commands (a parent parser), the drop schedule's options and loading the model they name."""

# Only light modules at the top: torch and transformers are imported inside the commands, so that
# `pdrop --help` and argument errors answer at once (tests/cli/test_cli_newcomer.py checks it).
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import re
from collections.abc import Iterator
from pathlib import Path

from pyramiddrop.cli.numbers import FRACTION, LAYER, OPEN_FRACTION, STAGES
from pyramiddrop.config import POSITION_MODES, PyramidDropConfig

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")  # owner/name, as on the Hugging Face hub
DTYPES = ("float32", "bfloat16", "float16")


class UsageError(Exception):
    """A command-line value that cannot work (a missing file, a model that is nowhere, a layer beyond the depth):
    `main` prints it as one line, `pdrop <command>: error: <message>`, with exit status 2; `pdrop --debug` shows
    the traceback."""


class RangeHelpFormatter(argparse.HelpFormatter):
    """Help that states each numeric option's range (from its type, `cli.numbers`)."""

    def _format_action(self, action: argparse.Action) -> str:
        text = getattr(action.type, "text", None)
        if text:
            action = copy.copy(action)
            action.help = f"{action.help} [{text}]" if action.help else f"[{text}]"
        return super()._format_action(action)


class Parser(argparse.ArgumentParser):
    """argparse's parser, whose errors (a value out of range, a missing option) are one line, as `UsageError`s."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", RangeHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


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


def model_options() -> argparse.ArgumentParser:
    """The options of every command that loads a model: which model, its attention kernel and dtype."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--model", help="hub id or local directory (default: the embedded synthetic LLaVA)")
    parent.add_argument("--attn", default="sdpa", help="eager, sdpa or flash_attention_2")
    parent.add_argument("--dtype", default="float32", choices=DTYPES)
    return parent


def _default_model(args: argparse.Namespace) -> str:
    if args.model is None:
        from pyramiddrop.synthetic.model import require_embedded_model

        args.model = str(require_embedded_model())
    return args.model


def model_depth(args: argparse.Namespace) -> int:
    """The decoder depth of `--model` (default: the embedded synthetic LLaVA), from its config alone: the checks
    that need it run before any weight is loaded."""
    from transformers import AutoConfig

    with hub_errors("--model", _default_model(args)):
        return AutoConfig.from_pretrained(args.model).get_text_config().num_hidden_layers


def load(args: argparse.Namespace):
    """Processor and model of `--model` (default: the embedded synthetic LLaVA)."""
    from pyramiddrop.tools.inputs import load_model

    with hub_errors("--model", _default_model(args)):
        return load_model(args.model, args.attn, args.dtype)


def check_layers(flag: str, layers: list[int], num_layers: int) -> None:
    """Drop layers against the model's depth, right after its config is read (a drop needs a layer after it)."""
    for layer in layers:
        if layer > num_layers - 1:
            raise UsageError(
                f"argument {flag}: layer {layer} is outside the model, which has {num_layers} decoder layers; give "
                f"layers from 0 to {num_layers - 1} (a drop after layer l needs a layer l+1)"
            )


def add_drop_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("PyramidDrop schedule (default: 4 stages, lam 0.5)")
    group.add_argument("--layer-list", type=LAYER, nargs="+", help="1-based layers after which to drop, e.g. 8 16 24")
    group.add_argument("--ratios", type=FRACTION, nargs="+", help="cumulative kept fraction per later stage")
    group.add_argument("--lam", type=OPEN_FRACTION, help="keep lam**s of the visual tokens in stage s")
    group.add_argument("--stages", type=STAGES, default=4, help="number of stages with --lam (default 4)")
    group.add_argument("--position-mode", choices=POSITION_MODES, default="compact")
    group.add_argument("--no-drop", action="store_true", help="run the unmodified model")


def drop_config_from_args(args: argparse.Namespace, num_layers: int) -> PyramidDropConfig | None:
    """The schedule the flags ask for, checked against the model's depth; errors name the flag to change."""
    if args.no_drop:
        return None
    if args.layer_list or args.ratios:
        if args.lam is not None:
            raise UsageError("argument --lam: give either --layer-list/--ratios or --lam, not both")
        if not (args.layer_list and args.ratios):
            raise UsageError("argument --layer-list: --layer-list and --ratios go together (one ratio per drop layer)")
        check_layers("--layer-list", args.layer_list, num_layers)
        return PyramidDropConfig(args.layer_list, args.ratios, position_mode=args.position_mode)
    if args.stages > num_layers:
        raise UsageError(
            f"argument --stages: {args.stages} stages do not fit a model with {num_layers} decoder layers; give 2 to "
            f"{num_layers}"
        )
    lam = 0.5 if args.lam is None else args.lam
    return PyramidDropConfig.from_lambda(num_layers, args.stages, lam, position_mode=args.position_mode)
