"""The selection methods by name: one table, without torch, that every list of method names is read from.

A method is a scorer (`pyramiddrop.scoring`, the registered name in `scorer`) on a schedule: where it drops and
what the engine config fixes for it. The config's scorer names (`config.BUILTIN_METHODS`), the budget variants
(`budget.METHODS`), the harness names (`integrations`) and the command line's choices and help all come from
here; tests/methods/test_methods_table.py checks the table against the registered scorers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

# Where a method drops. "pyramid": at the schedule's layers (a λ, a budget's equal stages or an explicit
# layer_list); "one drop": FastV's single drop after layer K; "before the LLM": one drop before layer 0;
# "before and inside the LLM": a drop before layer 0, then drops inside (VScan: layer_list=[0, K]).
PYRAMID, ONE_DROP, BEFORE_LLM, BEFORE_AND_INSIDE = "pyramid", "one drop", "before the LLM", "before and inside the LLM"


@dataclass(frozen=True)
class Method:
    name: str
    scorer: str  # the registered scorer that ranks (or merges) the visual tokens
    drops: str  # PYRAMID, ONE_DROP, BEFORE_LLM or BEFORE_AND_INSIDE
    ranks_by: str  # a few words: docs/configuration.md's table shows it (tests/project/test_docs_methods.py)
    fields: dict = field(default_factory=dict)  # what the method fixes in the engine config besides the scorer
    stochastic: bool = False  # draws random numbers (from a seed per sample: scorers' sample_seeds)
    merge: bool = False  # merges dropped tokens into kept ones instead of only selecting
    single_drop: bool = False  # only one drop per schedule (its own grid breaks after an earlier drop)
    needs: str = "nothing"  # what it reads or requires beyond the LLM, a few words (the docs' table too)
    # Tokens a merge keeps beyond the count at a drop keeping `keep` of `available` (SparseVLM's recycled ones).
    extra_kept: Callable[[int, int], int] | None = None
    # Merges video frames only: every image token stays, and how many video tokens do is set by the frames, so it
    # has no schedule at a budget of image tokens and no FLOPs from `int(N * ratio)` (the drop record counts them).
    video_only: bool = False

    @property
    def config_fields(self) -> dict:
        """The `PyramidDropConfig` fields this method sets (scorer included)."""
        return {"method": self.scorer, **self.fields}


def sparsevlm_recycled(keep: int, available: int) -> int:
    """SparseVLM's merged tokens at a drop keeping `keep` of `available`: `int(n / 10) + 1` clusters of the
    `n = int(0.3 * deleted) + 1` best-rated deleted tokens (none when nothing is deleted)."""
    deleted = available - keep
    return int((int(deleted * 0.3) + 1) / 10) + 1 if deleted > 0 else 0


TABLE: tuple[Method, ...] = (
    Method(
        "pdrop",
        "pdrop",
        PYRAMID,
        "the last prompt token's attention in the next layer",
        needs="the LLM's attention row (recomputed: any backend)",
    ),
    Method(
        "pdrop-original",
        "pdrop",
        PYRAMID,
        "as pdrop; kept tokens keep their original positions",
        {"position_mode": "original"},
        needs="as pdrop",
    ),
    Method(
        "pdrop-mean",
        "pdrop",
        PYRAMID,
        "as pdrop, mean attention of the instruction's tokens",
        {"query": "instruction_mean"},
        needs="the instruction (text after the image)",
    ),
    Method("random", "random", PYRAMID, "nothing: a seeded random draw per token", stochastic=True, needs="nothing"),
    Method("uniform", "uniform", PYRAMID, "position: evenly spread tokens", needs="nothing"),
    Method(
        "fastv",
        "fastv",
        ONE_DROP,
        "the last prompt token's attention in layer K-1",
        {"position_mode": "original"},
        single_drop=True,
        needs="layer K-1's attention row (recomputed); original positions",
    ),
    Method(
        "dart",
        "dart",
        ONE_DROP,
        "layer K-1: 4 image + 4 text pivots by key norm, each keeps its least similar tokens",
        {"position_mode": "original"},
        single_drop=True,
        needs="one image block with >= 4 text tokens after it; original positions",
    ),
    Method(
        "pivot-duplication",
        "pivot-duplication",
        PYRAMID,
        "least similar to 8 key-norm pivots, kept globally",
        needs="nothing",
    ),
    Method(
        "sparsevlm",
        "sparsevlm",
        PYRAMID,
        "text raters' attention in the layer before each drop",
        merge=True,
        needs="one image with text after it; compact 1-D positions; drops after layers >= 1",
        extra_kept=sparsevlm_recycled,
    ),
    Method(
        "sparsevlm-norecycle",
        "sparsevlm-norecycle",
        PYRAMID,
        "text raters' attention in the layer before each drop",
        needs="as sparsevlm",
    ),
    Method("divprune", "divprune", BEFORE_LLM, "diversity: greedy max-min of the projected tokens", needs="nothing"),
    Method(
        "visionzip",
        "visionzip",
        BEFORE_LLM,
        "the vision tower's CLS attention (dominant tokens)",
        needs="the tower's attention per patch (LLaVA-1.5)",
    ),
    Method(
        "vispruner",
        "vispruner",
        BEFORE_LLM,
        "CLS attention (important), then tower-feature similarity (diverse)",
        {"position_mode": "compact"},
        single_drop=True,
        needs="a CLIP tower with CLS; one image per sample (LLaVA-1.5)",
    ),
    Method(
        "conditional-dpp",
        "conditional-dpp",
        BEFORE_LLM,
        "conditional DPP, relevance from the LLM's instruction embeddings",
        {"position_mode": "compact", "query": "instruction_mean"},
        single_drop=True,
        needs="the instruction (text after the image)",
    ),
    Method(
        "pool",
        "pool",
        BEFORE_LLM,
        "position: kh x kw patch blocks averaged into one",
        merge=True,
        single_drop=True,
        needs="a square patch grid; keep ratios 1/(kh*kw)",
    ),
    Method(
        "vscan",
        "vscan",
        BEFORE_AND_INSIDE,
        "the tower's CLS attention in local and global scans; then as pdrop",
        merge=True,
        needs="LLaVA-1.5 tower of >= 6 layers, grid side a multiple of 6",
    ),
    Method(
        "dycoke-ttm",
        "dycoke-ttm",
        BEFORE_LLM,
        "similarity to the same token of an earlier frame (windows of 4)",
        {"video_pool": "frame"},
        single_drop=True,
        needs="videos of >= 5 frames",
        video_only=True,
    ),
)
BY_NAME = {method.name: method for method in TABLE}
# Papers' methods this package does not run, with what to use instead (the config says so when asked for one).
REFUSED = {
    "cdpruner": "method 'cdpruner' (CDPruner as released, Theia-4869/CDPruner 9541616c) scores relevance with CLIP's "
    "text tower and the vision tower's visual_projection, which Hugging Face LLaVA checkpoints do not include; "
    "method='conditional-dpp' runs its conditional DPP with the language model's embeddings of the instruction "
    "instead (a variant, not CDPruner).",
}
NAMES = tuple(BY_NAME)
SCORER_NAMES = tuple(sorted({method.scorer for method in TABLE}))  # what `pyramiddrop.scoring` registers
EXTRA_KEPT = {method.scorer: method.extra_kept for method in TABLE if method.extra_kept is not None}
VIDEO_ONLY_SCORERS = frozenset(method.scorer for method in TABLE if method.video_only)


def names(drops: str) -> tuple[str, ...]:
    """The methods that drop where `drops` says, in table order."""
    return tuple(method.name for method in TABLE if method.drops == drops)


def config_fields(name: str) -> dict:
    """The config fields of method `name`; unknown names raise, listing the known ones."""
    if name not in BY_NAME:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(NAMES)}.")
    return BY_NAME[name].config_fields


def describe() -> str:
    """The method names grouped by where they drop, for help texts."""
    kinds = (PYRAMID, ONE_DROP, BEFORE_LLM, BEFORE_AND_INSIDE)
    return "; ".join(f"{drops}: {', '.join(names(drops))}" for drops in kinds)
