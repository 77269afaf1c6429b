"""`pdrop`: the command line. `pdrop generate` answers one question about one image with PyramidDrop.

One module per command (`generate`, `evaluate` for `pdrop eval`, `tune`, `study`, `show`, `bench`, `train`), each
with `add_parser` and `run`; `common` holds the options they share and the one error type, `numbers` the ranges
of the numeric options.
"""

# Only light modules at the top: torch and transformers are imported inside the commands, so that
# `pdrop --help` and argument errors answer at once (tests/cli/test_cli_newcomer.py checks it).
from __future__ import annotations

from collections.abc import Sequence

from pyramiddrop.cli import bench, evaluate, generate, show, study, train, tune
from pyramiddrop.cli.common import Parser, UsageError, check_arguments, model_options

COMMANDS = (generate, evaluate, tune, study, show, bench, train)  # in `pdrop --help`'s order


def build_parser() -> Parser:
    parser = Parser(prog="pdrop", description=__doc__.split("\n\n")[0])
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    commands = parser.add_subparsers(dest="command", required=True)
    parents = [model_options()]
    for command in COMMANDS:
        command.add_parser(commands, parents)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "train":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.recipe_args = rest
    try:
        check_arguments(args)
        if hasattr(args, "check"):
            args.check(args)
        args.run(args)
    except (UsageError, ValueError) as error:  # a value to change: one line that says which; --debug: traceback
        if args.debug:
            raise
        parser.exit(2, f"pdrop {args.command}: error: {error}\n")


__all__ = ["UsageError", "build_parser", "main"]
