"""FLOPs of the language-model prefill, in the paper's convention and end to end.

Both count one multiply-add as one FLOP and each linear layer once, as the paper does, so the two numbers
are directly comparable. The paper's count covers visual tokens only and overstates end-to-end savings;
`prefill_flops` adds the text tokens, grouped-query K/V sizes, the ranking work and the LM head.
"""

from __future__ import annotations

from typing import Any

from pyramiddrop.config import PyramidDropConfig


def tokens_per_layer(num_layers: int, num_visual_tokens: int, config: PyramidDropConfig | None = None) -> list[int]:
    """Visual tokens each decoder layer processes: `int(N * ratio)` per stage, at least 1 (as the engine)."""
    counts, stage = [], 0
    boundaries = config.layer_list if config is not None else []
    for layer in range(num_layers):
        while stage < len(boundaries) and layer >= boundaries[stage]:
            stage += 1
        ratio = config.keep_ratio(stage) if config is not None else 1.0
        kept = int(num_visual_tokens * ratio)
        counts.append(max(kept, 1) if num_visual_tokens > 0 else 0)
    return counts


def paper_flops(
    num_layers: int,
    hidden_size: int,
    intermediate_size: int,
    num_visual_tokens: int,
    config: PyramidDropConfig | None = None,
) -> float:
    """The paper's convention: `4nd² + 2n²d + 3ndm` per layer over the n visual tokens of that layer."""
    d, m = hidden_size, intermediate_size
    return float(
        sum(
            4 * n * d * d + 2 * n * n * d + 3 * n * d * m
            for n in tokens_per_layer(num_layers, num_visual_tokens, config)
        )
    )


def prefill_flops(
    model_config: Any,
    num_text_tokens: int,
    num_visual_tokens: int,
    config: PyramidDropConfig | None = None,
    lm_head_tokens: int = 1,
) -> float:
    """End-to-end prefill FLOPs of the language model (no vision encoder).

    Per layer with n = text + visual tokens: Q and O projections 2nd², K and V 2n·d·d_kv, attention 2n²d,
    MLP 3ndm; plus, at each drop, the ranking (`RANKING_FLOPS` per method; attention ranking: k for all tokens,
    q and scores for the query row); plus the LM head on `lm_head_tokens` positions (1 in `generate`'s
    prefill). Accepts a VLM or text config.
    """
    text = getattr(model_config, "text_config", None) or model_config
    d, m, vocab = text.hidden_size, text.intermediate_size, text.vocab_size
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or d // heads
    kv_dim = getattr(text, "num_key_value_heads", heads) * head_dim
    q_dim = heads * head_dim
    total = 0.0
    for n_visual in tokens_per_layer(text.num_hidden_layers, num_visual_tokens, config):
        n = num_text_tokens + n_visual
        total += 2 * n * d * q_dim + 2 * n * d * kv_dim + 2 * n * n * q_dim + 3 * n * d * m
    if config is not None:
        per_layer = tokens_per_layer(text.num_hidden_layers, num_visual_tokens, config)
        ranking = RANKING_FLOPS.get(config.method, _attention_ranking)
        for layer in config.layer_list:  # the tokens entering the drop: layer `layer - 1`'s, or all before layer 0
            n_visual = per_layer[layer - 1] if layer > 0 else num_visual_tokens
            total += ranking(num_text_tokens + n_visual, n_visual, d, q_dim, kv_dim)
    return total + lm_head_tokens * d * vocab


def _attention_ranking(n: int, n_visual: int, d: int, q_dim: int, kv_dim: int) -> float:
    """k for all tokens, q and the scores for the query row (pdrop, FastV)."""
    return n * d * kv_dim + d * q_dim + n * q_dim


# What ranking costs per method, at one drop with n tokens (n_visual of them visual) of width d. Methods that read
# no features cost nothing here; visionzip's ranking runs in the vision tower (not counted: no vision encoder).
RANKING_FLOPS = {
    "random": lambda n, n_visual, d, q_dim, kv_dim: 0.0,
    "uniform": lambda n, n_visual, d, q_dim, kv_dim: 0.0,
    "pool": lambda n, n_visual, d, q_dim, kv_dim: n_visual * d,  # one add per feature
    "visionzip": lambda n, n_visual, d, q_dim, kv_dim: 0.0,
    "divprune": lambda n, n_visual, d, q_dim, kv_dim: n_visual * n_visual * d,  # the cosine distance matrix
    # the tower's attention and the matching rounds on the tower's features run in the vision encoder (not counted)
    "vispruner": lambda n, n_visual, d, q_dim, kv_dim: 0.0,
    # the similarity matrix, each visual token against the text tokens (an upper bound on the instruction)
    "conditional-dpp": lambda n, n_visual, d, q_dim, kv_dim: n_visual * n_visual * d + n_visual * (n - n_visual) * d,
    # keys of every token, the final norm, then 8 pivots against the visual tokens
    "dart": lambda n, n_visual, d, q_dim, kv_dim: n * d * kv_dim + n * d + 8 * n_visual * d,
    "pivot-duplication": lambda n, n_visual, d, q_dim, kv_dim: n * d * kv_dim + 8 * n_visual * d,  # keys, 8 pivots
}
