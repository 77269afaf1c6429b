"""`pdrop train`: the embedded synthetic task's training recipe; every flag goes to the recipe."""

from __future__ import annotations

import argparse


def add_parser(commands, parents: list[argparse.ArgumentParser]) -> None:
    train = commands.add_parser(
        "train",
        help="train the embedded synthetic task's model, with or without PyramidDrop (--drop-lam)",
        description="All flags go to the recipe: `pdrop train --help-recipe` lists them.",
    )
    train.add_argument("--help-recipe", action="store_true", help="list the recipe's flags")
    train.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    from pyramiddrop.synthetic import train

    train.main(["--help"] if args.help_recipe else args.recipe_args)
