"""The schedules `pdrop tune` searches: every one meets the budget, by construction.

A schedule is a stage count, the layers after which to drop and the visual tokens each later stage keeps
(strictly decreasing whole counts, at least one). The budget fixes the total cost, the sum over layers of a
per-layer cost of the tokens kept (the token count itself, or the paper's FLOPs of that many tokens), so one
count is not free: the search proposes the layers and all counts but the last, and the last is solved from the
budget. Proposals are numbers in [0, 1) that index into the values still feasible given the earlier choices
(a depth-first search with the budget's bounds as pruning), so a sampler such as optuna's TPE works on a fixed
box while every point of the box decodes to a schedule within the tolerance. No trial is wasted on a penalty.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from pyramiddrop.config import PyramidDropConfig

BUDGET_KINDS = ("tokens", "flops")
TOLERANCE = 0.02  # every schedule's cost is within 2 % of the budget's


def parse_stage_range(text: str) -> tuple[int, int]:
    """`"3"` or `"2-5"` as (lowest, highest) stage count; a ValueError naming the text otherwise."""
    parts = text.split("-")
    try:
        low, high = (int(parts[0]), int(parts[-1])) if len(parts) in (1, 2) else (0, -1)
    except ValueError:
        low, high = 0, -1
    if low < 1 or high < low:
        raise ValueError(f"stages {text!r} is not a stage count or a range such as 2-5 (low <= high, both >= 1).")
    return low, high


@dataclass(frozen=True)
class Schedule:
    """A decoded point: where to drop and the visual tokens each stage keeps (stage 0 keeps all N)."""

    layer_list: tuple[int, ...]
    kept: tuple[int, ...]
    num_visual_tokens: int

    def config(self, **kwargs) -> PyramidDropConfig:
        """The engine config: ratio (n + 0.5) / N makes the engine's `int(N * ratio)` keep exactly n."""
        ratios = [(n + 0.5) / self.num_visual_tokens for n in self.kept]
        return PyramidDropConfig(layer_list=list(self.layer_list), image_token_ratio_list=ratios, **kwargs)


@dataclass
class ScheduleSpace:
    """The schedules of a model's depth that meet `budget` (a fraction) within `TOLERANCE`.

    `kind="tokens"`: the budget is the average visual tokens per layer over N (as `pyramiddrop.budget`).
    `kind="flops"`: the paper-convention FLOPs (`pyramiddrop.flops.paper_flops`) over no drop's; it needs the
    width and MLP size. `stages`: the lowest and highest stage count searched (stages = drops + 1).
    """

    num_layers: int
    num_visual_tokens: int
    budget: float
    stages: tuple[int, int] = (2, 5)
    kind: str = "tokens"
    hidden_size: int | None = None
    intermediate_size: int | None = None
    layer_cost: Callable[[int], float] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.kind not in BUDGET_KINDS:
            raise ValueError(f"budget kind must be one of {BUDGET_KINDS}, got {self.kind!r}.")
        if not 0.0 < self.budget < 1.0:
            raise ValueError(f"budget must be a fraction in (0, 1) of no drop's cost, got {self.budget}.")
        if self.num_layers < 2 or self.num_visual_tokens < 2:
            raise ValueError(
                f"tuning needs at least 2 decoder layers and 2 visual tokens, got {self.num_layers} layers and "
                f"{self.num_visual_tokens} visual tokens."
            )
        low, high = self.stages
        if not 2 <= low <= high <= self.num_layers:
            raise ValueError(
                f"stages {low}-{high} is outside the model's depth: a model with {self.num_layers} decoder layers "
                f"has 2 to {self.num_layers} stages (a drop after any layer but the last)."
            )
        if self.kind == "tokens":
            self.layer_cost = float
        else:
            if self.hidden_size is None or self.intermediate_size is None:
                raise ValueError("a FLOPs budget needs hidden_size and intermediate_size (the paper's d and m).")
            d, m = self.hidden_size, self.intermediate_size
            self.layer_cost = lambda n: float(4 * n * d * d + 2 * n * n * d + 3 * n * d * m)
        self.target = self.budget * self.num_layers * self.layer_cost(self.num_visual_tokens)
        self.tolerance = TOLERANCE * self.target
        self.feasible_stages = [s for s in range(low, high + 1) if self._decode(s, [], []) is not None]
        if not self.feasible_stages:
            reach = self.reachable_budgets()
            raise ValueError(
                f"budget {self.budget:g} ({self.kind}) cannot be met with {low}-{high} stages on "
                f"{self.num_layers} layers and {self.num_visual_tokens} visual tokens: reachable budgets are "
                f"{reach[0]:.3f} to {reach[1]:.3f}; choose one in that range (or other --stages)."
            )

    def reachable_budgets(self) -> tuple[float, float]:
        """The lowest and highest budget any schedule with the searched stage counts has (a fraction)."""
        full = self.num_layers * self.layer_cost(self.num_visual_tokens)
        low = min(self._min_cost(tuple(range(1, s))) for s in range(self.stages[0], self.stages[1] + 1))
        high = max(
            self._max_cost(tuple(range(self.num_layers - s + 1, self.num_layers)))
            for s in range(self.stages[0], self.stages[1] + 1)
        )
        return low / full, high / full

    def decode(self, stages: int, layer_units: Sequence[float], keep_units: Sequence[float]) -> Schedule:
        """The schedule at a point of the box: `stages - 1` layer units and `stages - 2` keep units in [0, 1)."""
        if stages not in self.feasible_stages:
            raise ValueError(f"{stages} stages cannot meet the budget here; choose from {self.feasible_stages}.")
        schedule = self._decode(stages, list(layer_units), list(keep_units))
        assert schedule is not None  # a feasible stage count always decodes (the search is exhaustive)
        return schedule

    def cost_fraction(self, schedule: Schedule) -> float:
        """The schedule's cost over no drop's (the budget it achieves)."""
        counts = self._counts_per_layer(schedule.layer_list, schedule.kept)
        return sum(map(self.layer_cost, counts)) / (self.num_layers * self.layer_cost(self.num_visual_tokens))

    # The search. Stage s (1-based, s = 1..k) runs from layer_list[s-1] to the next drop (or the end).

    def _lengths(self, layers: tuple[int, ...]) -> list[int]:
        bounds = [*layers, self.num_layers]
        return [bounds[0], *(b - a for a, b in zip(bounds, bounds[1:]))]

    def _counts_per_layer(self, layers: Sequence[int], kept: Sequence[int]) -> list[int]:
        counts = [self.num_visual_tokens] * self.num_layers
        for start, n in zip(layers, kept):
            counts[start:] = [n] * (self.num_layers - start)
        return counts

    def _min_cost(self, layers: tuple[int, ...]) -> float:
        """Cheapest counts on these layers: k, k-1, ..., 1 tokens in the k later stages."""
        lengths, k = self._lengths(layers), len(layers)
        return lengths[0] * self.layer_cost(self.num_visual_tokens) + sum(
            lengths[s] * self.layer_cost(k - s + 1) for s in range(1, k + 1)
        )

    def _max_cost(self, layers: tuple[int, ...]) -> float:
        """Dearest counts on these layers: N-1, N-2, ... tokens in the later stages."""
        lengths = self._lengths(layers)
        return lengths[0] * self.layer_cost(self.num_visual_tokens) + sum(
            lengths[s] * self.layer_cost(self.num_visual_tokens - s) for s in range(1, len(layers) + 1)
        )

    def _layers_may_fit(self, prefix: tuple[int, ...], drops: int) -> bool:
        """Whether some completion of `prefix` to `drops` drops can meet the budget (a necessary condition:
        the earliest completion is the cheapest possible, the latest the dearest)."""
        rest = drops - len(prefix)
        earliest = prefix + tuple(range(prefix[-1] + 1, prefix[-1] + 1 + rest))
        latest = prefix + tuple(range(self.num_layers - rest, self.num_layers))
        return (
            self._min_cost(earliest) <= self.target + self.tolerance
            and self._max_cost(latest) >= self.target - self.tolerance
        )

    def _decode(self, stages: int, layer_units: list[float], keep_units: list[float]) -> Schedule | None:
        drops = stages - 1
        if drops > self.num_visual_tokens - 1:
            return None

        def place(prefix: tuple[int, ...]) -> Schedule | None:
            if len(prefix) == drops:
                kept = self._keep_counts(prefix, keep_units)
                return None if kept is None else Schedule(prefix, kept, self.num_visual_tokens)
            low = prefix[-1] + 1 if prefix else 1
            high = self.num_layers - (drops - len(prefix))
            options = [layer for layer in range(low, high + 1) if self._layers_may_fit((*prefix, layer), drops)]
            unit = layer_units[len(prefix)] if len(prefix) < len(layer_units) else 0.5
            for layer in _preference(options, unit):
                found = place((*prefix, layer))
                if found is not None:
                    return found
            return None

        return place(())

    def _keep_counts(self, layers: tuple[int, ...], keep_units: list[float]) -> tuple[int, ...] | None:
        lengths, k, cost, n_all = self._lengths(layers), len(layers), self.layer_cost, self.num_visual_tokens
        start = lengths[0] * cost(n_all)

        def choose(chosen: tuple[int, ...], spent: float) -> tuple[int, ...] | None:
            stage = len(chosen) + 1  # the stage whose count is chosen now
            previous = chosen[-1] if chosen else n_all
            if stage == k:  # the last count is solved from the budget
                best = min(range(1, previous), key=lambda n: abs(spent + lengths[k] * cost(n) - self.target))
                ok = abs(spent + lengths[k] * cost(best) - self.target) <= self.tolerance
                return (*chosen, best) if ok else None

            def may_fit(n: int) -> bool:
                after = spent + lengths[stage] * cost(n)
                cheapest = sum(lengths[t] * cost(k - t + 1) for t in range(stage + 1, k + 1))
                dearest = sum(lengths[t] * cost(n - (t - stage)) for t in range(stage + 1, k + 1))
                return (
                    cheapest <= self.target - after + self.tolerance and dearest >= self.target - after - self.tolerance
                )

            options = [n for n in range(k - stage + 1, previous) if may_fit(n)]
            unit = keep_units[stage - 1] if stage - 1 < len(keep_units) else 0.5
            for n in _preference(options, unit):
                found = choose((*chosen, n), spent + lengths[stage] * cost(n))
                if found is not None:
                    return found
            return None

        return choose((), start)


def _preference(options: list[int], unit: float) -> list[int]:
    """`options` nearest first to the one `unit` (in [0, 1)) points at: a feasible value for every unit."""
    if not options:
        return []
    index = min(int(unit * len(options)), len(options) - 1)
    order = sorted(range(len(options)), key=lambda position: (abs(position - index), position))
    return [options[position] for position in order]
