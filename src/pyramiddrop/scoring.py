"""Token-scoring functions: one small function per selection method, all behind one signature.

A scorer gets a `RankInputs` (the hidden states entering the layer after a stage boundary, that layer, and
masks) and returns a float32 `[batch, seq]` score; the engine keeps the highest-scoring visual tokens.
Register new methods with `@register_scorer("name")`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


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

    @property
    def visual_mask(self) -> torch.Tensor:
        return self.visual_index >= 0


Scorer = Callable[[RankInputs], torch.Tensor]
SCORERS: dict[str, Scorer] = {}


def register_scorer(name: str) -> Callable[[Scorer], Scorer]:
    def decorator(function: Scorer) -> Scorer:
        SCORERS[name] = function
        return function

    return decorator


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def _apply_rope(attention: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE as the model's own module applies it (x: [B, H, L, hd]; cos/sin: [B, L, hd])."""
    modeling = sys.modules[type(attention).__module__]
    apply = getattr(modeling, "apply_rotary_pos_emb", None)
    if apply is not None:
        return apply(x, x, cos, sin)[0]
    return x * cos.unsqueeze(1) + _rotate_half(x) * sin.unsqueeze(1)


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
    query = _apply_rope(attention, query, query_cos, query_sin)
    key = _apply_rope(attention, key, cos, sin)
    key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)  # GQA: expand key heads

    scaling = getattr(attention, "scaling", head_dim**-0.5)
    logits = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scaling  # [B, H, Q, L]
    positions = torch.arange(length, device=hidden.device)
    allowed = inputs.attention_mask[:, None, :] & (positions[None, None, :] <= query_index[..., None])
    logits = logits.masked_fill(~allowed[:, None], torch.finfo(torch.float32).min)
    probs = logits.softmax(dim=-1, dtype=torch.float32).mean(dim=1)  # [B, Q, L]
    weights = query_valid.float() / num_queries.clamp(min=1)[:, None]
    return (probs * weights[..., None]).sum(dim=1)
