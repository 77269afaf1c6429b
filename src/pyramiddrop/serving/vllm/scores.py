"""`pdrop` (and `fastv`, the same rule in the layer before the drop) scores from vLLM's own layer: the fused qkv projection and vLLM's rotary, then the same score function
as the transformers scorer (`pyramiddrop.scoring.attention.query_attention`)."""

from __future__ import annotations

import torch

from pyramiddrop.scoring.attention import query_attention


def pdrop_scores(
    layer, hidden: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor, query_rows: torch.Tensor
) -> torch.Tensor:
    """One request's tokens entering `layer` (vLLM keeps the residual stream as hidden + residual): the attention
    its query rows pay to every token in that layer, mean over heads and query rows. Returns [tokens] float32."""
    stream = hidden if residual is None else hidden + residual
    attention = layer.self_attn
    normed = layer.input_layernorm(stream)
    qkv, _ = attention.qkv_proj(normed)
    query, key, _ = qkv.split([attention.q_size, attention.kv_size, attention.kv_size], dim=-1)
    query, key = attention.rotary_emb(positions, query.contiguous(), key.contiguous())
    head_dim, length = attention.head_dim, stream.shape[0]
    query = query[query_rows].view(1, -1, attention.num_heads, head_dim).transpose(1, 2)
    key = key.view(1, length, attention.num_kv_heads, head_dim).transpose(1, 2)
    allowed = torch.arange(length, device=stream.device)[None, :] <= query_rows[:, None]
    weights = torch.full((1, query_rows.numel()), 1.0 / query_rows.numel(), device=stream.device)
    return query_attention(query, key, allowed[None], weights, attention.scaling)[0]
