"""Token-selection methods: one small scoring function per method, all behind one signature.

A scorer gets a `RankInputs` (the hidden states entering the layer after a stage boundary, that layer, and
masks) and returns a float32 `[batch, seq]` score; the engine keeps the highest-scoring visual tokens of
every ranking group. Register new methods with `@register_scorer("name")`. One file per kind of method:

- `attention.py`: `pdrop` (the paper: the query's attention in the next layer);
- `fastv.py`: `fastv` (FastV as released: the query's attention in the layer before the drop);
- `dart.py`: `dart` (DART as released: per-pivot duplication, pivots from the layer before the drop);
- `spatial.py`: `random`, `uniform` (no features at all);
- `diversity.py`: `pivot-duplication`, `divprune` (similarity between the visual tokens);
- `vision.py`: `visionzip` (the vision tower's own attention, read before the language model);
- `vispruner.py`: `vispruner` (VisPruner as released: the tower's CLS attention, then diverse tokens by its features);
- `dpp.py`: `conditional-dpp` (CDPruner's conditional DPP with relevance from the language model's embeddings);
- `pooling.py`: `pool` (a merge: k x k patch blocks averaged into one token each);
- `vscan.py`: `vscan` (VScan as released: global and local scans of the tower's attention with merging before the
  language model, then the next layer's attention inside it);
- `sparsevlm.py`: `sparsevlm` (SparseVLM as released: text raters, drops and token recycling), `sparsevlm-norecycle`;
- `dycoke.py`: `dycoke-ttm` (DyCoke's temporal token merging as released: later frames of a window lose the tokens
  most similar to an earlier frame's; its own keep count per frame).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


def rotate_half_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE as Llama, Mistral and Qwen2 apply it (x: [B, H, L, hd]; cos, sin: [B, L, hd])."""
    first, second = x.chunk(2, dim=-1)
    return x * cos.unsqueeze(1) + torch.cat((-second, first), dim=-1) * sin.unsqueeze(1)


@dataclass
class RankInputs:
    hidden_states: torch.Tensor  # [B, L, D], detached: ranking carries no gradient
    layer: nn.Module  # the first decoder layer of the next stage
    position_embeddings: tuple[torch.Tensor, torch.Tensor]  # (cos, sin) at the current positions
    attention_mask: torch.Tensor  # [B, L] bool, True for real tokens
    query_mask: torch.Tensor  # [B, L] bool, the rows whose attention ranks the visual tokens
    visual_index: torch.Tensor  # [B, L] index among the sample's droppable visual tokens, -1 for others
    stage: int  # the stage about to start (1 = first drop)
    sample_seeds: torch.Tensor | None = None  # [B] int64, each sample's own seed (stochastic methods draw from it)
    apply_rope: Callable = rotate_half_rope  # the model family's rotary formula (from its adapter)
    group_index: torch.Tensor | None = None  # [B, L] ranking group (sample pool or video frame), -1 outside
    keep: torch.Tensor | None = None  # [G] tokens each group keeps at this drop
    # [B, L] the vision tower's score per visual token (visionzip); [B, L, layers + 1] for scorers registered with
    # `vision_layers` (one column per listed tower layer, then the token's patch index in its image)
    vision_scores: torch.Tensor | None = None
    vision_features: torch.Tensor | None = None  # [B, L, C] the tower's features the projector reads (vispruner)
    sliding_window: int | None = None  # the layer's window (a query sees the last `sliding_window` slots), if any
    # The hidden states at the boundary (the last layer before the drop's output): `hidden_states` itself, unless
    # the scorer ranks with the layer before (`hidden_states` is then that layer's input).
    boundary_states: torch.Tensor | None = None
    final_norm: nn.Module | None = None  # the language model's final norm (DART compares tokens through it)
    # [B, L] what the method computed once per prefill from the language model's input (`INPUT_PRIORS`), at the
    # stage's slots: SparseVLM's text raters.
    input_prior: torch.Tensor | None = None
    frame_index: torch.Tensor | None = None  # [B, L] video frame of each visual token (unique in the batch), else -1

    @property
    def visual_mask(self) -> torch.Tensor:
        return self.visual_index >= 0


Scorer = Callable[[RankInputs], torch.Tensor]
# A merge turns the kept tokens' hidden states into summaries of what was dropped (pooling): it gets the rank
# inputs, the selection and the hidden states with their gradient, and returns hidden states of the same shape, or
# those and sort keys that move the kept tokens ([B, L]: ascending keys give the layout, see `stages.drop_stage`).
Merge = Callable[[RankInputs, torch.Tensor, torch.Tensor], torch.Tensor]
SCORERS: dict[str, Scorer] = {}
# Scorers that draw random numbers, from `RankInputs.sample_seeds`: a function of the config's seed and the sample's
# own prompt, so a sample keeps the same tokens alone or in any batch (and beams of one prompt agree).
STOCHASTIC_SCORERS: set[str] = set()
# Config-time checks of a method's constraints (raise ValueError saying what to change).
SCORER_CHECKS: dict[str, Callable] = {}
MERGES: dict[str, Merge] = {}
# Scorers that rank by the vision tower's attention: the engine captures it in the tower's forward.
VISION_ATTENTION_SCORERS: set[str] = set()
# Scorers that read several vision tower layers' attention (indices into the tower's layers, negative from the end).
VISION_LAYERS: dict[str, tuple[int, ...]] = {}
# Scorers that also read the vision tower's features (the projector's input): the engine captures them too.
VISION_FEATURE_SCORERS: set[str] = set()
# Scorers that read each video frame as its own grid: videos need `video_pool="frame"`.
PER_FRAME_SCORERS: set[str] = set()
# Scorers that rank with the layer before the boundary (FastV, DART): the engine hands them that layer, its input
# hidden states and its rotary embeddings instead of the next layer's.
LAYER_BEFORE_SCORERS: set[str] = set()
# Methods that read the language model's input once per prefill: `(embeds, attention_mask, pool, query_mask)` ->
# [B, L] in input coordinates, handed to every drop's scorer as `RankInputs.input_prior` (SparseVLM's raters).
INPUT_PRIORS: dict[str, Callable] = {}
# Methods that set how many tokens each ranking group keeps (DyCoke's TTM: by a frame's place in its window) instead
# of the engine's `int(N_g * ratio)`: `rule(stage, groups, frames, keep_ratio) -> [G]`.
KEEP_RULES: dict[str, Callable] = {}
# Methods whose kept tokens the language model sees in score order inside each group (DyCoke's release concatenates
# a merged frame's tokens in `topk` order), not in input order: `stages.score_order`'s keys for `drop_stage`.
SCORE_ORDER_SCORERS: set[str] = set()


def register_scorer(
    name: str,
    stochastic: bool = False,
    check: Callable | None = None,
    merge: Merge | None = None,
    vision_attention: bool = False,
    vision_layers: tuple[int, ...] | None = None,
    vision_features: bool = False,
    per_frame: bool = False,
    ranks_layer_before: bool = False,
    input_prior: Callable | None = None,
    keep_rule: Callable | None = None,
    score_order: bool = False,
) -> Callable[[Scorer], Scorer]:
    def decorator(function: Scorer) -> Scorer:
        SCORERS[name] = function
        if stochastic:
            STOCHASTIC_SCORERS.add(name)
        if check is not None:
            SCORER_CHECKS[name] = check
        if merge is not None:
            MERGES[name] = merge
        if vision_attention or vision_layers is not None:
            VISION_ATTENTION_SCORERS.add(name)
        if vision_layers is not None:
            VISION_LAYERS[name] = vision_layers
        if vision_features:
            VISION_FEATURE_SCORERS.add(name)
        if per_frame:
            PER_FRAME_SCORERS.add(name)
        if ranks_layer_before:
            LAYER_BEFORE_SCORERS.add(name)
        if input_prior is not None:
            INPUT_PRIORS[name] = input_prior
        if keep_rule is not None:
            KEEP_RULES[name] = keep_rule
        if score_order:
            SCORE_ORDER_SCORERS.add(name)
        return function

    return decorator


def within_group_index(inputs: RankInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Each visual token's index inside its ranking group, in sequence order ([B, L], -1 outside), and the
    groups' sizes ([G])."""
    group = inputs.group_index
    inside = group >= 0
    size = torch.bincount(group[inside], minlength=int(inputs.keep.numel()))
    flat_group = group[inside]
    order = torch.argsort(flat_group, stable=True)  # row-major sequence order inside each group
    start = torch.cumsum(size, 0) - size
    rank = torch.empty_like(flat_group)
    rank[order] = torch.arange(flat_group.numel(), device=group.device) - start[flat_group[order]]
    return torch.full_like(group, -1).masked_scatter(inside, rank), size


def image_block_text(
    method: str, visual: torch.Tensor, attention_mask: torch.Tensor, query_mask: torch.Tensor, rows: list[int]
) -> torch.Tensor:
    """The real tokens after each sample's visual tokens up to its last query row (the prompt's end), [B, L] bool,
    for methods whose release ranks one image with the text after it (DART, SparseVLM): a sample in `rows` whose
    visual tokens are not one block (several images, or layout tokens inside it) is refused."""
    slots = torch.arange(visual.shape[1], device=visual.device)
    count = visual.sum(1)
    first = torch.where(visual, slots, visual.shape[1]).min(1).values
    last = torch.where(visual, slots, -1).max(1).values
    end = torch.where(query_mask, slots, -1).max(1).values  # generate's candidates past the prompt excluded
    for row in rows:
        span = int(last[row] - first[row] + 1)
        if span != int(count[row]):
            raise ValueError(
                f"method {method!r} (as released) ranks one image per sample, one block of visual tokens with the text "
                f"after it: sample {row} has {int(count[row])} droppable visual tokens spread over {span} positions "
                "(several images, or layout tokens inside the block such as LLaVA-NeXT's row newlines). Use one "
                "image per prompt on a model without layout tokens, or another method."
            )
    return attention_mask & ~visual & (slots > last[:, None]) & (slots <= end[:, None])


from pyramiddrop.scoring import (  # noqa: E402,F401  (register)
    attention,
    dart,
    diversity,
    dpp,
    dycoke,
    fastv,
    pooling,
    sparsevlm,
    spatial,
    vision,
    vispruner,
    vscan,
)
from pyramiddrop.scoring.attention import attention_scores  # noqa: E402
from pyramiddrop.scoring.dart import dart_scores  # noqa: E402
from pyramiddrop.scoring.diversity import divprune_scores, duplication_scores  # noqa: E402
from pyramiddrop.scoring.spatial import random_scores, uniform_scores  # noqa: E402

__all__ = [
    "INPUT_PRIORS",
    "KEEP_RULES",
    "LAYER_BEFORE_SCORERS",
    "MERGES",
    "PER_FRAME_SCORERS",
    "SCORERS",
    "SCORE_ORDER_SCORERS",
    "SCORER_CHECKS",
    "STOCHASTIC_SCORERS",
    "VISION_ATTENTION_SCORERS",
    "VISION_FEATURE_SCORERS",
    "VISION_LAYERS",
    "RankInputs",
    "attention_scores",
    "dart_scores",
    "divprune_scores",
    "duplication_scores",
    "random_scores",
    "register_scorer",
    "rotate_half_rope",
    "uniform_scores",
]
