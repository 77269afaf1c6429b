"""FLOPs of the language-model prefill, in the paper's convention and end to end.

Both count one multiply-add as one FLOP and each linear layer once, as the paper does, so the two numbers
are directly comparable. The paper's count covers visual tokens only and overstates end-to-end savings;
`prefill_flops` adds the text tokens, grouped-query K/V sizes, the ranking work and the LM head.
"""

from __future__ import annotations

from typing import Any

from pyramiddrop.config import PyramidDropConfig
from pyramiddrop.methods import EXTRA_KEPT, VIDEO_ONLY_SCORERS


def tokens_per_layer(num_layers: int, num_visual_tokens: int, config: PyramidDropConfig | None = None) -> list[int]:
    """Visual tokens each decoder layer processes: `int(N * ratio)` per stage, at least 1 (as the engine), plus the
    tokens a merge keeps beyond that (SparseVLM's recycled ones)."""
    if config is not None and config.method in VIDEO_ONLY_SCORERS:
        raise ValueError(
            f"method {config.method!r} keeps a number of tokens set by each video's frames, not int(N * ratio); count "
            "its tokens per layer from the drop record (get_drop_record(model).visual_tokens_per_layer)."
        )
    boundaries = config.layer_list if config is not None else []
    extra = EXTRA_KEPT.get(config.method) if config is not None else None
    stage_counts = [num_visual_tokens]
    for stage in range(1, len(boundaries) + 1):
        available = stage_counts[-1]
        kept = min(max(int(num_visual_tokens * config.keep_ratio(stage)), 1), available)
        stage_counts.append(kept + extra(kept, available) if extra is not None else kept)
    counts, stage = [], 0
    for layer in range(num_layers):
        while stage < len(boundaries) and layer >= boundaries[stage]:
            stage += 1
        counts.append(stage_counts[stage] if num_visual_tokens > 0 else 0)
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
            rank = PRE_LLM_RANKING_FLOPS.get(config.method, ranking) if layer == 0 else ranking
            total += rank(num_text_tokens + n_visual, n_visual, d, q_dim, kv_dim)
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
    # keys of every token, then queries and scores for the raters' rows, counted as every text token (at most)
    "sparsevlm-norecycle": lambda n, n_visual, d, q_dim, kv_dim: n * d * kv_dim + (n - n_visual) * (d + n) * q_dim,
    # as sparsevlm-norecycle, plus the distances between the (at most 0.3 * n_visual) recycled candidates
    "sparsevlm": lambda n, n_visual, d, q_dim, kv_dim: (
        n * d * kv_dim + (n - n_visual) * (d + n) * q_dim + (0.3 * n_visual) ** 2 * d
    ),
}
# Methods whose drop before layer 0 costs something else than their later drops (VScan: the scans read the tower's
# attention, not counted; the merge compares every visual token with every kept one, counted as n_visual² · d).
PRE_LLM_RANKING_FLOPS = {"vscan": lambda n, n_visual, d, q_dim, kv_dim: n_visual * n_visual * d}
