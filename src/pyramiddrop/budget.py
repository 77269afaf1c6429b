"""Schedules at a matched budget, so that methods are compared on equal terms.

A budget is the average number of visual tokens per layer as a fraction of N (the literature's 192, 128 and
64 of 576 are 1/3, 2/9 and 1/9), or a fraction of the paper-convention FLOPs. The schedule (where to drop,
how many to keep) is chosen here; the scoring (which tokens) is the method's.
"""

from __future__ import annotations

import math
from dataclasses import replace

from pyramiddrop.config import PyramidDropConfig
from pyramiddrop.flops import paper_flops, tokens_per_layer
from pyramiddrop.methods import BEFORE_AND_INSIDE, BEFORE_LLM, BY_NAME, NAMES, ONE_DROP, PYRAMID, config_fields, names

FASTV_LAYER = 2  # FastV's K
# VScan's release script: 96 tokens before the LLM, 32 from layer 16 of 32 (an average of 64 of 576).
VSCAN_INSIDE_FRACTION, VSCAN_LAYER_FRACTION = 1 / 3, 1 / 2


def average_visual_fraction(config: PyramidDropConfig | None, num_layers: int, num_visual_tokens: int) -> float:
    """Average visual tokens per layer over N, with the engine's integer keep counts."""
    return sum(tokens_per_layer(num_layers, num_visual_tokens, config)) / (num_layers * num_visual_tokens)


def _bisect(function, low: float, high: float, target: float, steps: int = 60) -> float:
    """`x` in [low, high] with function(x) ≈ target, for an increasing function."""
    for _ in range(steps):
        middle = (low + high) / 2
        low, high = (middle, high) if function(middle) < target else (low, middle)
    return (low + high) / 2


def pyramid_schedule(budget: float, num_layers: int, num_visual_tokens: int, num_stages: int = 4) -> PyramidDropConfig:
    """PyramidDrop at an average visual-token budget: ratios λ, λ², λ³ over equal stages, λ solved for.

    Equal stages cannot go below 1/num_stages (stage 0 keeps everything); for lower budgets the first drop
    moves earlier (the remaining layers split equally), taking the placement that meets the budget best.
    """
    _check_budget(budget)
    equal = round(num_layers / num_stages)
    candidates = [equal] if budget * num_stages >= 1.15 else range(equal, 0, -1)
    best = None
    for first in candidates:
        config = _pyramid_with_first_drop(first, budget, num_layers, num_visual_tokens, num_stages)
        error = abs(average_visual_fraction(config, num_layers, num_visual_tokens) - budget)
        if best is None or error < best[0]:
            best = (error, config)
    return _checked(best[1], budget, num_layers, num_visual_tokens)


def _pyramid_with_first_drop(
    first: int, budget: float, num_layers: int, num_visual_tokens: int, num_stages: int
) -> PyramidDropConfig:
    step = (num_layers - first) / (num_stages - 1)
    layer_list = sorted({first + round(step * stage) for stage in range(num_stages - 1)} - {num_layers})

    def config_for(lam: float) -> PyramidDropConfig:
        ratios = [max(lam ** (stage + 1), 1e-9) for stage in range(len(layer_list))]
        return PyramidDropConfig(layer_list=layer_list, image_token_ratio_list=ratios)

    lam = _bisect(lambda x: average_visual_fraction(config_for(x), num_layers, num_visual_tokens), 1e-4, 0.9999, budget)
    return config_for(lam)


def fastv_schedule(
    budget: float, num_layers: int, num_visual_tokens: int, layer: int = FASTV_LAYER
) -> PyramidDropConfig:
    """FastV at a budget: one drop after `layer` (K) keeping R, ranked by layer K-1 (FastV as released)."""
    _check_budget(budget)
    layer = min(layer, max(1, int(budget * num_layers) - 1))
    kept = round((budget * num_layers - layer) * num_visual_tokens / (num_layers - layer))
    ratio = _ratio_keeping(kept, num_visual_tokens)
    config = PyramidDropConfig.fastv(layer, ratio)
    return _checked(config, budget, num_layers, num_visual_tokens)


def pre_llm_schedule(budget: float, num_layers: int, num_visual_tokens: int, method: str) -> PyramidDropConfig:
    """One drop before the first decoder layer keeping `budget` of the tokens (DivPrune, VisionZip), at original
    positions unless the method fixes them (VisPruner's release renumbers)."""
    _check_budget(budget)
    ratio = _ratio_keeping(round(budget * num_visual_tokens), num_visual_tokens)
    fields = {"position_mode": "original", **config_fields(method)}
    config = PyramidDropConfig(layer_list=[0], image_token_ratio_list=[ratio], **fields)
    return _checked(config, budget, num_layers, num_visual_tokens)


def vscan_schedule(budget: float, num_layers: int, num_visual_tokens: int) -> PyramidDropConfig:
    """VScan at a budget: T tokens before the LLM, T/3 from its middle layer on (the release's 96 -> 32 after layer
    16 of 32 for 64 of 576), T solved for the budget."""
    _check_budget(budget)
    layer = max(1, round(num_layers * VSCAN_LAYER_FRACTION))
    share = (layer + (num_layers - layer) * VSCAN_INSIDE_FRACTION) / num_layers
    before = min(round(budget * num_visual_tokens / share), num_visual_tokens)
    inside = min(round(before * VSCAN_INSIDE_FRACTION), before - 1)
    ratios = [_ratio_keeping(before, num_visual_tokens), _ratio_keeping(inside, num_visual_tokens)]
    config = PyramidDropConfig(layer_list=[0, layer], image_token_ratio_list=ratios, method="vscan")
    return _checked(config, budget, num_layers, num_visual_tokens)


def pool_schedule(budget: float, num_layers: int, num_visual_tokens: int) -> PyramidDropConfig:
    """Average pooling before the first layer with the kernel whose keep fraction 1/(kh*kw) is nearest `budget`.

    Pooling keeps only such fractions (1/2, 1/3, 1/4, 1/6, 1/9, ...): the schedule says what it reached (its
    `average_visual_fraction`) instead of meeting the budget within 2%, and the table shows it.
    """
    from pyramiddrop.scoring.pooling import pool_kernel

    _check_budget(budget)
    side = math.isqrt(num_visual_tokens)
    areas = [
        area for area in range(2, num_visual_tokens + 1) if side * side == num_visual_tokens and pool_kernel(side, area)
    ]
    if not areas:
        raise ValueError(
            f"pooling needs a square patch grid whose side has divisors; {num_visual_tokens} visual tokens is none."
        )
    area = min(areas, key=lambda a: abs(1 / a - budget))
    ratio = _ratio_keeping(num_visual_tokens // area, num_visual_tokens)
    return PyramidDropConfig(layer_list=[0], image_token_ratio_list=[ratio], method="pool", position_mode="original")


def budget_from_flops_fraction(
    flops_fraction: float, num_layers: int, hidden_size: int, intermediate_size: int, num_visual_tokens: int
) -> float:
    """The average-token budget whose PyramidDrop schedule costs `flops_fraction` of no-drop paper FLOPs."""
    _check_budget(flops_fraction)
    shape = (num_layers, hidden_size, intermediate_size, num_visual_tokens)
    full = paper_flops(*shape)

    def fraction(budget: float) -> float:
        return paper_flops(*shape, pyramid_schedule(budget, num_layers, num_visual_tokens)) / full

    return _bisect(fraction, 0.02, 0.999, flops_fraction, steps=30)


# Methods compared at a budget (from `pyramiddrop.methods`): FastV, the pre-LLM methods and pooling have their own
# schedules; every other method uses the pyramid schedule and differs only in the config fields it sets (scoring,
# or, for the PyramidDrop variants, query or positions).
METHODS = {name: config_fields(name) for name in names(PYRAMID)}
PRE_LLM_METHODS = tuple(name for name in names(BEFORE_LLM) if not BY_NAME[name].merge)  # one drop before layer 0
METHODS_ONE_DROP = {name: config_fields(name) for name in names(ONE_DROP)}
SCHEDULE_METHODS = (*names(ONE_DROP), *names(BEFORE_LLM), *names(BEFORE_AND_INSIDE))
ALL_METHODS = NAMES


def schedule_for(method: str, budget: float, num_layers: int, num_visual_tokens: int) -> PyramidDropConfig:
    """The config of `method` at `budget`."""
    if method not in BY_NAME:
        raise ValueError(f"unknown method {method!r}; choose from {list(ALL_METHODS)}.")
    if BY_NAME[method].video_only:
        raise ValueError(
            f"method {method!r} merges video frames only: it keeps every image token, and how many video tokens is "
            "set by each video's frames, so it has no schedule at a budget of visual tokens; configure it directly "
            "(PyramidDropConfig.dycoke_ttm(k=0.7))."
        )
    drops = BY_NAME[method].drops
    if drops == ONE_DROP:  # FastV's schedule, ranked by the method (FastV, DART)
        return replace(fastv_schedule(budget, num_layers, num_visual_tokens), **METHODS_ONE_DROP[method])
    if drops == BEFORE_AND_INSIDE:
        return vscan_schedule(budget, num_layers, num_visual_tokens)
    if drops == BEFORE_LLM:
        if BY_NAME[method].merge:
            return pool_schedule(budget, num_layers, num_visual_tokens)
        return pre_llm_schedule(budget, num_layers, num_visual_tokens, method)
    return replace(pyramid_schedule(budget, num_layers, num_visual_tokens), **METHODS[method])


def _ratio_keeping(kept: int, num_visual_tokens: int) -> float:
    """The keep ratio whose `int(N * ratio)` is exactly `kept` (at least 1), safe from float rounding."""
    return min((max(kept, 1) + 0.5) / num_visual_tokens, 1.0)


def _check_budget(budget: float) -> None:
    if not 0.0 < budget < 1.0:
        raise ValueError(f"budget must be a fraction in (0, 1) of the visual tokens (or FLOPs), got {budget}.")


def _checked(config: PyramidDropConfig, budget: float, num_layers: int, num_visual_tokens: int) -> PyramidDropConfig:
    achieved = average_visual_fraction(config, num_layers, num_visual_tokens)
    if abs(achieved - budget) > 0.02 * budget:
        raise ValueError(
            f"cannot reach an average of {budget:.3f} of {num_visual_tokens} visual tokens over {num_layers} layers "
            f"(closest: {achieved:.3f}); use a larger budget or a model with more visual tokens."
        )
    return config
