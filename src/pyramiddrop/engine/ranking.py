"""Scoring at a stage boundary: the method's scores, the selection, and the per-sample seeds of random methods."""

from __future__ import annotations

import hashlib

import torch

from pyramiddrop.engine.stages import Groups, Stage, available_counts, score_order, select
from pyramiddrop.engine.stages import keep_counts as ratio_keep_counts
from pyramiddrop.methods import EXTRA_KEPT
from pyramiddrop.scoring import KEEP_RULES, MERGES, SCORE_ORDER_SCORERS, SCORERS, RankInputs


def sample_seeds(
    seed: int | torch.Tensor,
    input_ids: torch.Tensor | None,
    attention_mask: torch.Tensor,
    prompt_length: int | None = None,
) -> torch.Tensor:
    """One seed per sample, from the config's seed and the sample's own prompt tokens alone ([batch] int64).

    Stochastic methods draw from it, so a sample drops the same tokens alone or in any batch, at any row, with
    any padding, in any call order. The prompt is the sample's real tokens before `prompt_length` (generate's
    later tokens never change it); without input ids (inputs_embeds only) it is the sample's token count.
    `seed` may be a tensor of earlier seeds (a re-ranking turn mixes its new tokens into them).
    """
    batch, length = attention_mask.shape
    real = attention_mask.bool()
    if prompt_length is not None:
        real = real & (torch.arange(length, device=real.device) < prompt_length)
    base = seed.tolist() if isinstance(seed, torch.Tensor) else [seed] * batch
    seeds = []
    for row in range(batch):
        digest = hashlib.sha256(str(int(base[row])).encode())
        if input_ids is not None:
            digest.update(input_ids[row][real[row]].to("cpu", torch.int64).numpy().tobytes())
        else:
            digest.update(str(int(real[row].sum())).encode())
        seeds.append(int.from_bytes(digest.digest()[:8], "little") >> 1)  # non-negative int64
    return torch.tensor(seeds, dtype=torch.long)


def keep_counts(
    method: str, previous: Stage, groups: Groups, keep_ratio: float, frames: torch.Tensor | None
) -> torch.Tensor:
    """Tokens each group keeps at a drop: the method's own rule (DyCoke's TTM), else `int(N_g * keep_ratio)`."""
    if method in KEEP_RULES:
        return KEEP_RULES[method](previous, groups, frames, keep_ratio)
    return ratio_keep_counts(previous, groups, keep_ratio)


def rank_and_select(
    method: str, previous: Stage, keep: torch.Tensor, **rank_fields
) -> tuple[RankInputs, torch.Tensor, torch.Tensor | None]:
    """Score the previous stage's visual tokens with `method` and keep the top `keep[g]` of every group; also the
    order to lay the kept tokens out in (`stages.score_order`) for methods that keep score order, else None."""
    with torch.no_grad():
        inputs = RankInputs(
            attention_mask=previous.attention_mask,
            query_mask=previous.query_mask,
            visual_index=previous.pool_index,
            group_index=previous.group_index,
            keep=keep,
            **rank_fields,
        )
        if method in EXTRA_KEPT:  # tokens a merge keeps beyond the method's count (SparseVLM's recycled ones)
            available = available_counts(previous, keep.numel())
            extra = [EXTRA_KEPT[method](k, a) for k, a in zip(keep.tolist(), available.tolist())]
            keep = keep + torch.tensor(extra, dtype=keep.dtype, device=keep.device)
        scores = SCORERS[method](inputs)
        selected = select(previous, scores, keep)
        order = score_order(scores, previous.group_index, selected) if method in SCORE_ORDER_SCORERS else None
    return inputs, selected, order


def merge_dropped(
    method: str, inputs: RankInputs, selected: torch.Tensor, hidden: torch.Tensor, order: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A merge method rewrites the kept tokens' hidden states to summarise the dropped ones (with gradient); some
    also move the kept tokens, and their sort keys replace `order` (`rank_and_select`'s): the keys for `drop_stage`."""
    if method not in MERGES:
        return hidden, order
    merged = MERGES[method](inputs, selected, hidden)
    return merged if isinstance(merged, tuple) else (merged, order)


def place_vision_scores(scores: torch.Tensor | None, token_mask: torch.Tensor, method: str) -> torch.Tensor | None:
    """The vision tower's score (`[total]`; `[total, columns]` for `vision_layers` scorers) or features (`[total,
    width]`) of every image token, placed where the model scattered its features (`[batch, seq, ...]`).

    A text-only prefill has none to place (the capture still holds the tower's last run, kept for generate's
    later prefills of the same images).
    """
    if scores is None or not bool(token_mask.any()):
        return None
    num_tokens = int(token_mask.sum())
    if num_tokens > scores.shape[0] and num_tokens % scores.shape[0] == 0:
        raise ValueError(
            f"method {method!r} ranks by the vision tower's attention, which generate() computes once per image "
            f"before it repeats the images for num_beams or num_return_sequences ({scores.shape[0]} patches scored "
            f"for {num_tokens} image tokens); use num_beams=1 and num_return_sequences=1 with this method."
        )
    if scores.shape[0] != num_tokens:
        raise ValueError(
            f"method {method!r}: the vision tower scored {scores.shape[0]} patches for {num_tokens} image "
            "tokens; this model does not place one token per patch."
        )
    # Extra axes (several tower layers and the patch index for `vision_layers` scorers, or the features' width).
    placed = torch.zeros(*token_mask.shape, *scores.shape[1:], device=token_mask.device, dtype=scores.dtype)
    placed[token_mask] = scores.to(token_mask.device)
    return placed
