"""Scoring at a stage boundary: the method's scores, the selection, and the per-sample seeds of random methods."""

from __future__ import annotations

import hashlib

import torch

from pyramiddrop.engine.stages import Stage, select
from pyramiddrop.scoring import MERGES, SCORERS, RankInputs


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


def rank_and_select(method: str, previous: Stage, keep: torch.Tensor, **rank_fields) -> tuple[RankInputs, torch.Tensor]:
    """Score the previous stage's visual tokens with `method` and keep the top `keep[g]` of every group."""
    with torch.no_grad():
        inputs = RankInputs(
            attention_mask=previous.attention_mask,
            query_mask=previous.query_mask,
            visual_index=previous.pool_index,
            group_index=previous.group_index,
            keep=keep,
            **rank_fields,
        )
        selected = select(previous, SCORERS[method](inputs), keep)
    return inputs, selected


def merge_dropped(method: str, inputs: RankInputs, selected: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """A merge method rewrites the kept tokens' hidden states to summarise the dropped ones (with gradient)."""
    if method in MERGES:
        return MERGES[method](inputs, selected, hidden)
    return hidden


def place_vision_scores(scores: torch.Tensor | None, token_mask: torch.Tensor, method: str) -> torch.Tensor | None:
    """The vision tower's score (`[total]`) or features (`[total, width]`) of every image token, placed where the
    model scattered its features (`[batch, seq]` or `[batch, seq, width]`).

    A text-only prefill has none to place (the capture still holds the tower's last run, kept for generate's
    later prefills of the same images).
    """
    if scores is None or not bool(token_mask.any()):
        return None
    if scores.shape[0] != int(token_mask.sum()):
        raise ValueError(
            f"method {method!r}: the vision tower scored {scores.shape[0]} patches for {int(token_mask.sum())} image "
            "tokens; this model does not place one token per patch."
        )
    placed = torch.zeros(*token_mask.shape, *scores.shape[1:], device=token_mask.device, dtype=scores.dtype)
    placed[token_mask] = scores.to(token_mask.device)
    return placed
