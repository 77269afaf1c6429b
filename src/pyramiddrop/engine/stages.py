"""The drop itself, as pure functions on plain `[batch, seq]` tensors: no modules, no hooks, no cache.

A prefill's layout is a list of `Stage`s, one per stage of the language model. Stage 0 holds the whole input;
at each boundary the scorer's scores pick the visual tokens to keep (`keep_counts`, `top_per_group`) and
`drop_stage` turns the previous stage and that selection into the next stage plus the index that gathers the
hidden states. The transformers hooks (`hooks.py`) and the vLLM plugin both call these functions, so the two
front ends keep the same tokens.

Sequences stay batched: after a drop every row holds its kept tokens in original order, right-aligned, with
masked filler slots on the left, so `generate()`'s "last token at index -1" still holds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100
POSITION_MODES = ("compact", "original")


@dataclass
class Stage:
    """One stage's sequence layout after prefill, all tensors `[batch, seq]` in that stage's coordinates."""

    attention_mask: torch.Tensor  # bool, False for padding and filler
    positions: torch.Tensor  # position ids used in prefill, `[..., batch, seq]` (M-RoPE: a leading axis of 3)
    source_index: torch.Tensor  # position in the original input, -1 for filler
    pool_index: torch.Tensor  # index among the sample's droppable visual tokens, -1 otherwise
    group_index: torch.Tensor  # ranking group (a sample's pool, or one video frame), -1 outside the pool
    query_mask: torch.Tensor  # bool, the rows that rank visual tokens
    dropped: torch.Tensor  # [batch] real tokens dropped before this stage (the compact decode shift)
    block_index: torch.Tensor | None = None  # bidirectional image block of each token (Gemma 3), -1 for text

    @property
    def pool(self) -> torch.Tensor:
        """The droppable visual tokens still alive in this stage."""
        return self.pool_index >= 0


@dataclass
class Groups:
    """Ranking groups, numbered 0..G-1 over the batch; each group lies in one row."""

    index: torch.Tensor  # [batch, seq] group of every droppable visual token, -1 elsewhere
    size: torch.Tensor  # [G] droppable visual tokens of each group at stage 0
    row: torch.Tensor  # [G] the batch row each group lies in


def ranking_groups(pool: torch.Tensor, frames: torch.Tensor | None = None, per_frame: bool = False) -> Groups:
    """One group per sample, or with `per_frame` one per video frame plus one for the sample's images.

    `pool`: [batch, seq] droppable visual tokens; `frames`: [batch, seq] video frame of each token (ids unique in
    the batch), -1 for image tokens and text.
    """
    batch = pool.shape[0]
    rows = torch.arange(batch, device=pool.device)[:, None].expand_as(pool)
    group = rows
    if frames is not None and per_frame:
        group = torch.where(frames >= 0, frames + batch, rows)
    values, dense = torch.unique(group[pool], return_inverse=True)
    size = torch.bincount(dense, minlength=values.numel())
    return Groups(
        index=torch.full_like(rows, -1).masked_scatter(pool, dense),
        size=size,
        row=torch.zeros_like(size).scatter(0, dense, rows[pool]),
    )


def query_rows(
    attention_mask: torch.Tensor,
    token_mask: torch.Tensor,
    answer_mask: torch.Tensor | None = None,
    prompt_length: int | None = None,
    instruction_mean: bool = False,
) -> torch.Tensor:
    """The rows whose attention ranks the visual tokens, `[batch, seq]` bool.

    Training (`answer_mask`: tokens with a label): the token right before each answer span. Inference: the last
    real prompt token (tokens past `prompt_length`, generate's candidates, never rank), or with `instruction_mean`
    every real prompt token after the last visual token.
    """
    if answer_mask is not None:
        starts = answer_mask[:, 1:] & ~answer_mask[:, :-1]
        return torch.cat([starts, torch.zeros_like(starts[:, :1])], dim=1) & attention_mask
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    prompt = attention_mask
    if prompt_length is not None:
        prompt = attention_mask & (positions < prompt_length)
    if instruction_mean:
        last_visual = torch.where(token_mask, positions, -1).max(dim=1, keepdim=True).values
        return prompt & (positions > last_visual)
    last_real = torch.where(prompt, positions, -1).max(dim=1, keepdim=True).values
    return positions == last_real


def first_stage(
    attention_mask: torch.Tensor,
    positions: torch.Tensor,
    pool: torch.Tensor,
    groups: Groups,
    query_mask: torch.Tensor,
    block_index: torch.Tensor | None = None,
) -> Stage:
    """Stage 0: the whole input, droppable visual tokens numbered 0..N_b-1 per sample."""
    length = attention_mask.shape[1]
    return Stage(
        attention_mask=attention_mask,
        positions=positions,
        source_index=torch.arange(length, device=attention_mask.device).expand_as(attention_mask),
        pool_index=torch.where(pool, pool.long().cumsum(1) - 1, -1),
        group_index=groups.index,
        query_mask=query_mask,
        dropped=torch.zeros(attention_mask.shape[0], dtype=torch.long, device=attention_mask.device),
        block_index=block_index,
    )


def available_counts(previous: Stage, num_groups: int) -> torch.Tensor:
    """[G] visual tokens each ranking group still has in `previous` (what a drop can keep at most)."""
    return torch.bincount(previous.group_index[previous.pool], minlength=num_groups)


def keep_counts(previous: Stage, groups: Groups, keep_ratio: float) -> torch.Tensor:
    """Tokens each group keeps in the next stage: `int(N_g * keep_ratio)` of its stage-0 tokens, at least one.

    A group whose sample has no query row (a training sample without an answer) keeps what it has.
    """
    available = available_counts(previous, groups.size.numel())
    keep = (groups.size.double() * keep_ratio).floor().long().clamp(min=1)
    has_query = previous.query_mask.any(1)[groups.row]
    return torch.where(has_query, torch.minimum(keep, available), available)


def drops_nothing(previous: Stage, groups: Groups, keep: torch.Tensor) -> bool:
    """Whether every group keeps all the tokens it has (the next stage is the previous one)."""
    return bool((keep >= available_counts(previous, groups.size.numel())).all())


def top_per_group(scores: torch.Tensor, group: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Select the `keep[g]` highest-scoring tokens of every group g (`group`: [batch, seq], -1 outside any group).

    Sort by score, then (stably) by group: each group becomes a run ordered by score, and a token's rank in its
    group is its distance from the run's start. Ties go to the earlier token.
    """
    order = scores.argsort(dim=1, descending=True, stable=True)
    grouped = group.gather(1, order)
    grouped = torch.where(grouped < 0, keep.numel(), grouped)  # tokens outside any group sort last
    regroup = grouped.argsort(dim=1, stable=True)
    order, grouped = order.gather(1, regroup), grouped.gather(1, regroup)
    rank = torch.arange(grouped.shape[1], device=grouped.device) - torch.searchsorted(grouped, grouped)
    limit = torch.cat([keep, keep.new_zeros(1)])[grouped]
    return torch.zeros_like(group, dtype=torch.bool).scatter(1, order, rank < limit)


def select(previous: Stage, scores: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The visual tokens kept: the top `keep[g]` scores of every group, query rows that are visual always kept.

    A query that is itself a visual token (an answer right after the image, in training) stays: later stages rank
    with it.
    """
    pool = previous.pool
    scores = scores.float().masked_fill(~pool, float("-inf"))
    scores = scores.masked_fill(pool & previous.query_mask, float("inf"))
    return top_per_group(scores, previous.group_index, keep)


def score_order(scores: torch.Tensor, group: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """Sort keys ([batch, seq]) that lay each group's kept tokens on the group's kept slots in descending score order
    (ties: the earlier token), every other token on its own slot: DyCoke's release concatenates a merged frame's
    kept tokens in `topk` order. A group keeping all its tokens at equal scores keeps its order."""
    slots = torch.arange(scores.shape[1], device=scores.device).expand_as(group)
    grouped = torch.where(selected, group, torch.iinfo(torch.long).max)  # everything else sorts last
    by_score = scores.float().masked_fill(~selected, float("-inf")).argsort(dim=1, descending=True, stable=True)
    by_score = by_score.gather(1, grouped.gather(1, by_score).argsort(dim=1, stable=True))
    by_slot = grouped.argsort(dim=1, stable=True)  # slot order inside each group
    keys = torch.empty_like(slots).scatter(1, by_score, by_slot)
    return torch.where(selected, keys, slots)


def drop_stage(
    previous: Stage, selected: torch.Tensor, position_mode: str, order: torch.Tensor | None = None
) -> tuple[Stage, torch.Tensor]:
    """The next stage after keeping `selected` visual tokens (and every text token), and its gather index.

    `index[b, j]` is the previous stage's slot that the next stage's slot j holds (filler slots point at 0 and are
    masked). With `position_mode="compact"` positions are renumbered without gaps (the reference); with
    `"original"` kept tokens keep theirs (FastV's port; M-RoPE). `order` ([batch, seq] sort keys, float or integer;
    None: slot order) lays the kept tokens out in ascending key order (ties: the earlier slot) instead of slot order:
    DyCoke's TTM permutes a frame's kept slots into score order (`score_order`), SparseVLM's merge moves its
    recycled tokens after the kept visual ones (fractional keys). Compact positions count in the laid-out order (the
    j-th kept token laid out takes the compact position of the j-th kept slot: both releases renumber the merged
    sequence); with "original" every kept token carries its own position wherever it moves.
    """
    if position_mode not in POSITION_MODES:
        raise ValueError(f"position_mode must be one of {POSITION_MODES}, got {position_mode!r}.")
    kept = previous.attention_mask & (~previous.pool | selected)
    removed = previous.attention_mask & ~kept
    new_length = int(kept.sum(1).max())
    slots = torch.arange(kept.shape[1], device=kept.device)
    in_order = torch.sort(torch.where(kept, slots, -1), dim=1).values[:, -new_length:]
    filler = in_order < 0
    in_order = in_order.clamp(min=0)
    index = in_order
    if order is not None:  # the same kept tokens per row (so the same filler), laid out by their keys
        keys = torch.where(kept, order.double(), float("-inf"))
        index = keys.argsort(dim=1, stable=True)[:, -new_length:].masked_fill(filler, 0)

    def take(values: torch.Tensor, fill: int | bool) -> torch.Tensor:
        return values.gather(1, index).masked_fill(filler, fill)

    positions = previous.positions
    if position_mode == "compact":
        positions = positions - removed.long().cumsum(1)
    # Positions may carry leading axes (M-RoPE): gather along the sequence, kept tokens keep their values (compact:
    # the positions of the slots, so that they count in the laid-out order).
    by = in_order if position_mode == "compact" else index
    positions = positions.gather(-1, by.expand(*positions.shape[:-2], *by.shape)).masked_fill(filler, 0)
    stage = Stage(
        attention_mask=~filler,
        positions=positions,
        source_index=take(previous.source_index, -1),
        pool_index=take(torch.where(kept, previous.pool_index, -1), -1),
        group_index=take(torch.where(kept, previous.group_index, -1), -1),
        query_mask=take(previous.query_mask, False),
        dropped=previous.dropped + removed.sum(1),
        block_index=None if previous.block_index is None else take(previous.block_index, -1),
    )
    return stage, index


def gather_tokens(hidden: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`hidden` [batch, seq, width] at the slots of a `drop_stage` index."""
    return hidden.gather(1, index[..., None].expand(-1, -1, hidden.shape[-1]))


def gather_labels(labels: torch.Tensor, stage: Stage) -> torch.Tensor:
    """Input-length labels aligned with a stage's slots (filler ignored), for the loss on the kept tokens."""
    source = stage.source_index
    return labels.gather(1, source.clamp(min=0)).masked_fill(source < 0, IGNORE_INDEX)
