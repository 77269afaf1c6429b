"""Named drop settings: `Setting` (a method name, its engine config and how it was chosen) and `DropRequest` (drop
settings given as strings or numbers, checked before any model is loaded and resolved into a `Setting` once the
model's depth and visual-token count are known).

The command line's rows and the harness integrations both resolve their settings here, so the same words give
the same configs everywhere.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field, replace
from typing import Any

from pyramiddrop.budget import schedule_for
from pyramiddrop.config import PyramidDropConfig
from pyramiddrop.methods import ONE_DROP, PYRAMID, config_fields, names

logger = logging.getLogger("pyramiddrop.integrations")


def describe_config(config: PyramidDropConfig) -> dict:
    """What a results row says about its config: the schedule, the positions, the scorer and the query."""
    return {
        "layer_list": config.layer_list,
        "image_token_ratio_list": [round(r, 6) for r in config.image_token_ratio_list],
        "position_mode": config.position_mode,
        "scorer": config.method,
        "query": config.query,
    }


@dataclass
class Setting:
    """One row of a results table: a method name (`"none"` for no drop) and its engine config."""

    method: str
    config: PyramidDropConfig | None
    extra: dict = field(default_factory=dict)  # e.g. {"lam": 0.5} or {"budget": 0.33}

    @property
    def settings(self) -> dict:
        if self.config is None:
            return dict(self.extra)
        return {**describe_config(self.config), **self.extra}


NO_DROP = ("none", "nodrop", "no-drop", "no_drop", "baseline")
# The harnesses' names: no drop, FastV and the methods that run on any pyramid schedule (a λ, a budget, a list).
ALL_METHODS = ("none", *names(ONE_DROP), *names(PYRAMID))
SCHEDULE_EXAMPLES = (
    "layer_list=8-16-24,ratios=0.5-0.25-0.125 (drop after these 1-based layers, keep these fractions), "
    "lam=0.5,stages=4 (the paper's equal stages) or budget=0.33 (average visual tokens per layer over N)"
)


def parse_int_list(value: Any, name: str) -> list[int]:
    """`8-16-24`, `8 16 24`, `[8,16,24]`, `8` or a Python list: harness argument strings cannot hold commas."""
    items = _split_list(value)
    try:
        numbers = [float(item) for item in items]
    except ValueError:
        numbers = []
    if not numbers or any(number != int(number) for number in numbers):
        raise ValueError(
            f"{name}={value!r} is not a list of integers; separate them with '-', e.g. {name}=8-16-24 "
            "(commas split harness model_args)."
        )
    return [int(number) for number in numbers]


def parse_float_list(value: Any, name: str) -> list[float]:
    """`0.5-0.25-0.125`, `0.5 0.25`, `[0.5,0.25]`, `0.5` or a Python list."""
    items = _split_list(value)
    try:
        numbers = [float(item) for item in items]
    except ValueError:
        numbers = []
    if not numbers:
        raise ValueError(
            f"{name}={value!r} is not a list of numbers; separate them with '-', e.g. {name}=0.5-0.25-0.125 "
            "(commas split harness model_args)."
        )
    return numbers


def _split_list(value: Any) -> list[str]:
    if isinstance(value, list | tuple):
        return [str(item) for item in value]
    if isinstance(value, int | float) and not isinstance(value, bool):
        return [str(value)]
    text = str(value).strip().strip("[]()")
    return [item for item in re.split(r"[-\s,;/|]+", text) if item]


@dataclass
class DropRequest:
    """The drop settings as a harness gives them (`from_args`, checked for consistency before any model is loaded),
    or as `pdrop eval` builds its rows (the fields directly); `resolve` turns either into the engine config.

    Exactly one schedule (`layer_list` + `ratios`, `lam` [+ `stages`], or `budget`) or none (no drop). `method`
    is a name of `pyramiddrop.methods` (the harnesses take `ALL_METHODS`: the rankings on any pyramid schedule and
    FastV's single drop); `none` is the unmodified model. The schedule of a budget depends on the visual-token count
    N, so it is resolved from `num_visual_tokens` or, if not given, from the first image the model sees.
    """

    method: str = "none"
    layer_list: list[int] | None = None
    ratios: list[float] | None = None
    lam: float | None = None
    stages: int | None = None
    budget: float | None = None
    overrides: dict = field(default_factory=dict)  # position_mode, query, seed, video_pool given explicitly
    num_visual_tokens: int | None = None

    @classmethod
    def from_args(
        cls,
        method: str | None = None,
        layer_list: Any = None,
        ratios: Any = None,
        lam: Any = None,
        stages: Any = None,
        budget: Any = None,
        position_mode: str | None = None,
        query: str | None = None,
        seed: Any = None,
        video_pool: str | None = None,
        num_visual_tokens: Any = None,
    ) -> DropRequest:
        """Parse and cross-check; every error says which argument to change and how."""
        explicit = method is not None and str(method).strip() != ""
        name = str(method).strip().lower() if explicit else "none"
        name = "none" if name in NO_DROP else name
        if name not in ALL_METHODS:
            raise ValueError(f"method={method!r} is unknown; use one of {', '.join(ALL_METHODS)}.")
        schedules = [
            label
            for label, given in (
                ("layer_list/ratios", layer_list is not None or ratios is not None),
                ("lam", lam is not None),
                ("budget", budget is not None),
            )
            if given
        ]
        if len(schedules) > 1:
            raise ValueError(f"give one schedule, not {' and '.join(schedules)}: {SCHEDULE_EXAMPLES}.")
        if stages is not None and lam is None:
            raise ValueError("stages only applies with lam (e.g. lam=0.5,stages=4); remove stages or add lam.")
        if (layer_list is None) != (ratios is None):
            raise ValueError(
                "layer_list and ratios go together, one keep ratio per drop layer, e.g. "
                "layer_list=8-16-24,ratios=0.5-0.25-0.125."
            )
        if explicit and name == "none" and schedules:
            raise ValueError(
                f"method={method} means no drop but a schedule ({schedules[0]}) was given; remove method to use "
                "PyramidDrop (method=pdrop is the default with a schedule) or remove the schedule."
            )
        if name == "fastv" and lam is not None:
            raise ValueError(
                "method=fastv is one drop: give budget=0.33, or layer_list=K,ratios=R (e.g. layer_list=2,ratios=0.5)."
            )
        if not schedules and name != "none":
            raise ValueError(
                f"method={method} needs a schedule: add {SCHEDULE_EXAMPLES}; leave method out (or method=none) "
                "to run the model without dropping."
            )
        if schedules and not explicit:
            name = "pdrop"
        request = cls(method=name, num_visual_tokens=_optional_int(num_visual_tokens, "num_visual_tokens"))
        if layer_list is not None:
            request.layer_list = parse_int_list(layer_list, "layer_list")
            request.ratios = parse_float_list(ratios, "ratios")
            if name == "fastv" and len(request.layer_list) != 1:
                raise ValueError(
                    f"method=fastv drops once; give one layer and one ratio (e.g. layer_list=2,ratios=0.5), got "
                    f"layer_list={request.layer_list}."
                )
        if lam is not None:
            request.lam = _number(lam, "lam")
            request.stages = 4 if stages is None else _optional_int(stages, "stages")
        if budget is not None:
            request.budget = _number(budget, "budget")
        given = {"position_mode": position_mode, "query": query, "video_pool": video_pool}
        request.overrides = {key: str(value) for key, value in given.items() if value is not None}
        if seed is not None:
            request.overrides["seed"] = _optional_int(seed, "seed")
        fixed = _method_fields(name)
        for key, value in request.overrides.items():
            if key in fixed and fixed[key] != value:
                raise ValueError(
                    f"method={name} sets {key}={fixed[key]!r}; remove {key}={value} or choose another method."
                )
        if request.overrides and name == "none":
            raise ValueError(
                f"{', '.join(request.overrides)} only apply when dropping; add a schedule ({SCHEDULE_EXAMPLES})."
            )
        request._check_values()
        return request

    def _check_values(self) -> None:
        """Range checks that need no model (depth and N are checked when the model is known)."""
        if not self.drops:
            return
        fields = {**_method_fields(self.method), **self.overrides}
        if self.layer_list is not None:
            PyramidDropConfig(self.layer_list, self.ratios, **fields)
            return
        PyramidDropConfig(**fields)  # position_mode, query, video_pool, seed
        if self.lam is not None:
            if not 0.0 < self.lam < 1.0:
                raise ValueError(f"lam must be in (0, 1), e.g. lam=0.5, got {self.lam}.")
            if self.stages < 2:
                raise ValueError(f"stages must be at least 2 (stage 0 keeps every token), got {self.stages}.")
        if self.budget is not None and not 0.0 < self.budget < 1.0:
            raise ValueError(
                f"budget must be in (0, 1) (average visual tokens per layer over N, e.g. 0.33 for 192 of 576), "
                f"got {self.budget}."
            )

    def describe(self) -> dict:
        """The settings as given (before the model resolves them into a schedule)."""
        given = {"layer_list": self.layer_list, "ratios": self.ratios, "lam": self.lam, "stages": self.stages}
        given |= {"budget": self.budget, "num_visual_tokens": self.num_visual_tokens}
        return {key: value for key, value in given.items() if value is not None} | self.overrides

    @property
    def drops(self) -> bool:
        return self.method != "none"

    @property
    def needs_visual_tokens(self) -> bool:
        """Whether the schedule depends on the visual-token count N (only budgets do)."""
        return self.budget is not None and self.num_visual_tokens is None

    def resolve(
        self, num_layers: int, num_visual_tokens: int | None = None, position_modes: tuple[str, ...] | None = None
    ) -> Setting:
        """The engine config for a model with `num_layers` decoder layers, as a `pdrop eval` row's `Setting`.

        `position_modes` (the family's valid modes): when the user gave no `position_mode` and the method's default
        is invalid for the family (Qwen-VL takes only `original`), the valid one is used and logged.
        """
        if not self.drops:
            return Setting("none", None)
        if self.budget is not None:
            n = self.num_visual_tokens or num_visual_tokens
            config = schedule_for(self.method, self.budget, num_layers, int(n))
            extra = {"budget": self.budget}
        elif self.lam is not None:
            config = replace(
                PyramidDropConfig.from_lambda(num_layers, self.stages, self.lam), **_method_fields(self.method)
            )
            extra = {"lam": self.lam, "stages": self.stages}
        else:
            config = PyramidDropConfig(self.layer_list, self.ratios, **_method_fields(self.method))
            extra = {}
        config = replace(config, **self.overrides)
        if position_modes and "position_mode" not in self.overrides and config.position_mode not in position_modes:
            logger.warning(
                "pyramiddrop: position_mode=%r is not valid for this model family; using %r (pass position_mode= to "
                "choose).",
                config.position_mode,
                position_modes[0],
            )
            config = replace(config, position_mode=position_modes[0])
        config.validate_for(num_layers)
        return Setting(self.method, config, extra)


def _method_fields(method: str) -> dict:
    return {} if method == "none" else config_fields(method)


def _number(value: Any, name: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r} is not a number (e.g. {name}=0.5).") from None


def _optional_int(value: Any, name: str) -> int | None:
    if value is None:
        return None
    number = _number(value, name)
    if number != int(number):
        raise ValueError(f"{name}={value!r} must be an integer.")
    return int(number)
