"""Token-scoring functions: one small function per selection method, all behind one signature.

A scorer gets a `RankInputs` (the hidden states entering the layer after a stage boundary, that layer, and
masks) and returns a float32 `[batch, seq]` score; the engine keeps the highest-scoring visual tokens.
Register new methods with `@register_scorer("name")`.
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
    generator: torch.Generator | None = None
    apply_rope: Callable = rotate_half_rope  # the model family's rotary formula (from its adapter)

    @property
    def visual_mask(self) -> torch.Tensor:
        return self.visual_index >= 0


Scorer = Callable[[RankInputs], torch.Tensor]
SCORERS: dict[str, Scorer] = {}
# Scorers that draw random numbers: rows of one batch get different draws, so beams of one prompt would drop
# different tokens, which beam search's cache reordering cannot follow (generate refuses num_beams > 1).
STOCHASTIC_SCORERS: set[str] = set()


def register_scorer(name: str, stochastic: bool = False) -> Callable[[Scorer], Scorer]:
    def decorator(function: Scorer) -> Scorer:
        SCORERS[name] = function
        if stochastic:
            STOCHASTIC_SCORERS.add(name)
        return function

    return decorator


@register_scorer("pdrop")
def attention_scores(inputs: RankInputs) -> torch.Tensor:
    """PyramidDrop: attention that the query rows pay to each token in the next layer, mean over heads.

    Only the query rows get a q projection (the reference recomputes q, k and v for every token).
    """
    layer, hidden = inputs.layer, inputs.hidden_states
    attention = layer.self_attn
    batch, length, _ = hidden.shape
    head_dim = attention.head_dim
    normed = layer.input_layernorm(hidden)

    num_queries = inputs.query_mask.sum(-1)  # [B]
    max_queries = max(int(num_queries.max()), 1)
    # Query positions, padded per row with the last valid one; `query_valid` marks the real ones.
    query_index = torch.sort(
        torch.where(inputs.query_mask, torch.arange(length, device=hidden.device), -1), dim=-1
    ).values[:, -max_queries:]
    query_valid = query_index >= 0
    query_index = query_index.clamp(min=0)

    gathered = normed.gather(1, query_index[..., None].expand(-1, -1, normed.shape[-1]))
    query = attention.q_proj(gathered).view(batch, max_queries, -1, head_dim).transpose(1, 2)
    key = attention.k_proj(normed).view(batch, length, -1, head_dim).transpose(1, 2)
    if hasattr(attention, "q_norm"):  # Qwen3-style per-head norms sit before RoPE
        query, key = attention.q_norm(query), attention.k_norm(key)
    cos, sin = inputs.position_embeddings
    query_cos = cos.expand(batch, -1, -1).gather(1, query_index[..., None].expand(-1, -1, cos.shape[-1]))
    query_sin = sin.expand(batch, -1, -1).gather(1, query_index[..., None].expand(-1, -1, sin.shape[-1]))
    query = inputs.apply_rope(query, query_cos, query_sin)
    key = inputs.apply_rope(key, cos, sin)
    if key.shape[1] != query.shape[1]:  # GQA: expand key heads
        key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)

    scaling = getattr(attention, "scaling", head_dim**-0.5)
    with torch.autocast(hidden.device.type, enabled=False):  # bf16 autocast (Trainer, TRL) would round them back
        logits = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scaling  # [B, H, Q, L]
    positions = torch.arange(length, device=hidden.device)
    allowed = inputs.attention_mask[:, None, :] & (positions[None, None, :] <= query_index[..., None])
    logits = logits.masked_fill(~allowed[:, None], torch.finfo(torch.float32).min)
    probs = logits.softmax(dim=-1, dtype=torch.float32).mean(dim=1)  # [B, Q, L]
    weights = query_valid.float() / num_queries.clamp(min=1)[:, None]
    return (probs * weights[..., None]).sum(dim=1)


@register_scorer("random", stochastic=True)
def random_scores(inputs: RankInputs) -> torch.Tensor:
    """Random pruning, reproducible through `PyramidDropConfig.seed`."""
    # One draw per visual token (by its index in the pool), not per sequence slot: the same tokens win
    # whatever text follows the image (assisted decoding's candidates, a longer prompt).
    index = inputs.visual_index
    draws = torch.rand(index.shape[0], max(1, int(index.max()) + 1), generator=inputs.generator)
    return draws.to(index.device).gather(1, index.clamp(min=0))


def _dither_rank(size: int) -> torch.Tensor:
    """Bayer ordered-dither ranks of a `size`x`size` grid: every prefix of the order is spread evenly."""
    order = torch.zeros(1, 1, dtype=torch.long)
    while order.shape[0] < size:
        order = torch.cat([torch.cat([4 * order, 4 * order + 2], 1), torch.cat([4 * order + 3, 4 * order + 1], 1)], 0)
    return order[:size, :size].flatten().argsort().argsort()  # dense ranks of the cropped grid


def _van_der_corput_rank(count: int) -> torch.Tensor:
    bits = max(count - 1, 1).bit_length()
    reversed_index = torch.tensor([int(f"{index:0{bits}b}"[::-1], 2) for index in range(count)])
    return reversed_index.argsort().argsort()


@register_scorer("uniform")
def uniform_scores(inputs: RankInputs) -> torch.Tensor:
    """Spatially uniform subsampling: an evenly spread subset of each sample's visual tokens.

    A square token count is read as a patch grid (ordered-dither order); any other count as a sequence
    (bit-reversed order). Either way the kept set of any size covers the image evenly.
    """
    scores = torch.zeros(inputs.visual_index.shape, dtype=torch.float32)
    for row, visual_index in enumerate(inputs.visual_index.cpu()):
        count = int(visual_index.max()) + 1
        if count <= 0:
            continue
        side = int(round(count**0.5))
        rank = _dither_rank(side) if side * side == count else _van_der_corput_rank(count)
        present = visual_index >= 0
        scores[row, present] = (count - rank[visual_index[present]]).float()
    return scores.to(inputs.visual_index.device)


@register_scorer("dart")
def duplication_scores(inputs: RankInputs, num_pivots: int = 8) -> torch.Tensor:
    """DART-style diversity: keep the visual tokens least similar to a few pivots (no attention needed).

    Pivots are the visual tokens with the largest key norms in the next layer; they are always kept, the
    others score by minus their largest cosine similarity to any pivot.
    """
    layer, hidden = inputs.layer, inputs.hidden_states
    keys = layer.self_attn.k_proj(layer.input_layernorm(hidden)).float()
    visual = inputs.visual_mask
    norms = keys.norm(dim=-1).masked_fill(~visual, float("-inf"))
    pivots = norms.topk(min(num_pivots, hidden.shape[1]), dim=-1).indices  # [B, P]
    pivot_valid = visual.gather(1, pivots)
    features = torch.nn.functional.normalize(hidden.float(), dim=-1)
    pivot_features = features.gather(1, pivots[..., None].expand(-1, -1, features.shape[-1]))
    similarity = torch.einsum("bld,bpd->blp", features, pivot_features).masked_fill(~pivot_valid[:, None], -1.0)
    scores = -similarity.max(dim=-1).values
    return scores.scatter(1, pivots, torch.where(pivot_valid, 2.0, scores.gather(1, pivots)))
