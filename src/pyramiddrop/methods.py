"""The selection methods by name: one table, without torch, that every list of method names is read from.

A method is a scorer (`pyramiddrop.scoring`, the registered name in `scorer`) on a schedule: where it drops and
what the engine config fixes for it. The config's scorer names (`config.BUILTIN_METHODS`), the budget variants
(`budget.METHODS`), the harness names (`integrations`) and the command line's choices and help all come from
here; tests/test_methods_table.py checks the table against the registered scorers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Where a method drops. "pyramid": at the schedule's layers (a λ, a budget's equal stages or an explicit
# layer_list); "one drop": FastV's single drop after layer K; "before the LLM": one drop before layer 0.
PYRAMID, ONE_DROP, BEFORE_LLM = "pyramid", "one drop", "before the LLM"


@dataclass(frozen=True)
class Method:
    name: str
    scorer: str  # the registered scorer that ranks (or merges) the visual tokens
    drops: str  # PYRAMID, ONE_DROP or BEFORE_LLM
    ranks_by: str
    fields: dict = field(default_factory=dict)  # what the method fixes in the engine config besides the scorer
    stochastic: bool = False  # draws random numbers (from a seed per sample: scorers' sample_seeds)
    merge: bool = False  # merges dropped tokens into kept ones instead of only selecting
    single_drop: bool = False  # only one drop per schedule (its own grid breaks after an earlier drop)
    needs: str = ""

    @property
    def config_fields(self) -> dict:
        """The `PyramidDropConfig` fields this method sets (scorer included)."""
        return {"method": self.scorer, **self.fields}


TABLE: tuple[Method, ...] = (
    Method("pdrop", "pdrop", PYRAMID, "the last prompt token's attention in the next layer (the paper)"),
    Method(
        "pdrop-original",
        "pdrop",
        PYRAMID,
        "as pdrop, kept tokens keep their original positions",
        {"position_mode": "original"},
    ),
    Method(
        "pdrop-mean",
        "pdrop",
        PYRAMID,
        "as pdrop, the mean attention of the instruction's tokens",
        {"query": "instruction_mean"},
    ),
    Method("random", "random", PYRAMID, "nothing: a seeded random choice", stochastic=True),
    Method("uniform", "uniform", PYRAMID, "position: evenly spaced tokens"),
    Method(
        "fastv",
        "fastv",
        ONE_DROP,
        "the last prompt token's attention in layer K-1, the layer before its one drop (FastV as released)",
        {"position_mode": "original"},
        single_drop=True,
        needs="one drop after layer K >= 1, original positions",
    ),
    Method(
        "dart",
        "dart",
        ONE_DROP,
        "duplication (DART as released): 4 image + 4 text pivots by layer K-1's key norms, each keeps its least "
        "similar tokens on layer K-1's output",
        {"position_mode": "original"},
        single_drop=True,
        needs="one drop after layer K >= 1, one image block per sample, >= 4 text tokens after it",
    ),
    Method(
        "pivot-duplication",
        "pivot-duplication",
        PYRAMID,
        "duplication: least similar to 8 pivot tokens chosen by key norm (a DART-like variant, not DART)",
    ),
    Method("divprune", "divprune", BEFORE_LLM, "diversity: a max-min subset of the visual features"),
    Method(
        "visionzip",
        "visionzip",
        BEFORE_LLM,
        "the vision tower's attention",
        needs="one image token per vision patch (LLaVA-1.5)",
    ),
    Method(
        "vispruner",
        "vispruner",
        BEFORE_LLM,
        "VisPruner as released: the CLS attention of the vision tower's feature layer (important), then the rest "
        "thinned by similarity of the tower's features (diverse)",
        {"position_mode": "compact"},
        single_drop=True,
        needs="a CLIP tower with CLS, one image per sample (LLaVA-1.5)",
    ),
    Method(
        "conditional-dpp",
        "conditional-dpp",
        BEFORE_LLM,
        "conditional DPP (CDPruner's selection, relevance from the language model's input embeddings of the "
        "instruction instead of CLIP's text tower: a variant, not CDPruner)",
        {"position_mode": "compact", "query": "instruction_mean"},
        single_drop=True,
        needs="text after the image",
    ),
    Method(
        "pool",
        "pool",
        BEFORE_LLM,
        "position: k x k patch blocks averaged into one token",
        merge=True,
        single_drop=True,
        needs="a square patch grid; keep ratios 1/(kh*kw)",
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
    return "; ".join(f"{drops}: {', '.join(names(drops))}" for drops in (PYRAMID, ONE_DROP, BEFORE_LLM))
