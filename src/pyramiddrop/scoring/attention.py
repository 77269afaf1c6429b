"""`pdrop`: the paper's ranking, the attention the query rows pay to each token in the next layer."""

from __future__ import annotations

import torch

from pyramiddrop.scoring import RankInputs, register_scorer


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
    positions = torch.arange(length, device=hidden.device)
    allowed = inputs.attention_mask[:, None, :] & (positions[None, None, :] <= query_index[..., None])
    if inputs.sliding_window is not None:  # as transformers' sliding_window_overlay: kv > q - window
        allowed &= positions[None, None, :] > query_index[..., None] - inputs.sliding_window
    weights = query_valid.float() / num_queries.clamp(min=1)[:, None]
    scaling = getattr(attention, "scaling", head_dim**-0.5)
    return query_attention(query, key, allowed, weights, scaling)


def query_attention(
    query: torch.Tensor, key: torch.Tensor, allowed: torch.Tensor, weights: torch.Tensor, scaling: float
) -> torch.Tensor:
    """The pdrop score from projected, rotated queries and keys, in float32: each query row's softmax attention,
    mean over heads, weighted sum over query rows. Shared by the transformers scorer above and the vLLM plugin
    (pyramiddrop.serving.vllm), which projects with its own fused layers.

    query: [B, H, Q, hd]; key: [B, H_kv, L, hd] (H_kv divides H: grouped-query attention); allowed: [B, Q, L] bool,
    the keys each query row sees; weights: [B, Q], each query row's weight (0 for padding rows). Returns [B, L].
    """
    if key.shape[1] != query.shape[1]:  # GQA: expand key heads
        key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
    with torch.autocast(query.device.type, enabled=False):  # bf16 autocast (Trainer, TRL) would round them back
        logits = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scaling  # [B, H, Q, L]
    logits = logits.masked_fill(~allowed[:, None], torch.finfo(torch.float32).min)
    probs = logits.softmax(dim=-1, dtype=torch.float32).mean(dim=1)  # [B, Q, L]
    return (probs * weights[..., None]).sum(dim=1)
