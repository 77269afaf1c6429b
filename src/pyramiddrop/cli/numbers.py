"""Argument types for numbers that state their valid range: a value outside it, or no number at all, is a one-line
error naming the option at parsing, before anything is loaded (tests/cli/test_cli_numbers.py walks every option)."""

from __future__ import annotations

import argparse
import math


class Number:
    """An argparse type: an `int` or `float` in [low, high] (an end is left out with `low_open` / `high_open`)."""

    def __init__(
        self,
        kind: type,
        text: str,
        low: float | None = None,
        high: float | None = None,
        low_open: bool = False,
        high_open: bool = False,
    ) -> None:
        self.kind, self.text = kind, text
        self.low, self.high, self.low_open, self.high_open = low, high, low_open, high_open
        self.__name__ = text  # what argparse's own messages call the type

    def __call__(self, text: str):
        try:
            value = self.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number; give {self.text}") from None
        if not self.contains(value):
            raise argparse.ArgumentTypeError(f"{text} is out of range; give {self.text}")
        return value

    def contains(self, value: float) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return not (self.high is not None and (value >= self.high if self.high_open else value > self.high))

    def outside(self) -> list[str]:
        """Values just outside the range, one per end (what the parser test feeds every option)."""
        step = 1 if self.kind is int else 0.001
        values = []
        if self.low is not None:
            values.append(self.low if self.low_open else self.low - step)
        if self.high is not None:
            values.append(self.high if self.high_open else self.high + step)
        return [str(self.kind(value)) if self.kind is int else f"{value:g}" for value in values]


POSITIVE = Number(int, "a positive integer (1 or more)", low=1)
NON_NEGATIVE = Number(int, "an integer of 0 or more", low=0)
SEED = Number(int, "a seed, an integer of 0 or more", low=0)
LAYER = Number(int, "a layer count of 0 or more (1-based: drop after that layer; 0: before the first)", low=0)
STAGES = Number(int, "a stage count of 2 or more (stage 0 keeps every token)", low=2)
TURNS = Number(int, "a turn count of 2 or more (a follow-up needs a first turn)", low=2)
FRACTION = Number(float, "a fraction in (0, 1]", low=0.0, high=1.0, low_open=True)
OPEN_FRACTION = Number(float, "a fraction in (0, 1)", low=0.0, high=1.0, low_open=True, high_open=True)


class StageRange:
    """`--stages 3` or `--stages 2-5`: stage counts of 2 or more, low <= high."""

    text = "a stage count or range of 2 or more, e.g. 4 or 2-5"
    __name__ = text

    def __call__(self, text: str) -> tuple[int, int]:
        from pyramiddrop.tune_space import parse_stage_range

        try:
            low, high = parse_stage_range(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {self.text} (low <= high)") from None
        if low < 2:
            raise argparse.ArgumentTypeError(f"{text} is out of range; give {self.text}")
        return low, high

    def outside(self) -> list[str]:
        return ["1", "1-3"]


STAGE_RANGE = StageRange()
