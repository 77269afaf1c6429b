"""`dart`: DART as released (ZichenWen1/DART, arXiv 2502.11494, `DART.get_retained_image_token` in
`llava/model/language_model/modeling_llama_self.py`): one drop before layer K, from layer K-1.

The release, at layer K (its `pruned_layer`, default 2), batch 1, one image:
- pivots: the 4 image tokens and the 4 tokens after the image (the instruction) with the largest L1 norm of layer
  K-1's key states after RoPE (all heads, one row per token);
- features: layer K-1's output through the model's final norm, compared by cosine similarity;
- selection: it visits the 8 pivots in the iteration order of a Python `set` of their sequence indices, and each
  pivot in turn takes the `TOKEN_TOPK` remaining image tokens least similar to it; the image pivots and every
  pick are kept, text is never dropped, kept tokens keep their original positions.

It keeps `4 + 8 * TOKEN_TOPK` image tokens (`TOKEN_TOPK = max_num_trunction // 8`; Qwen2-VL's release:
`int(N * (1 - reduction_ratio) / 8)`). Here the count is the engine's, `keep = int(N * ratio)` per sample, and
`TOKEN_TOPK = ceil((keep - 4) / 8)`: at `keep = 4 + 8 * T` this is exactly the release's set, otherwise its
first `keep` tokens in the order the release adds them (image pivots by norm, then each pivot's picks, least
similar first). That is the one deviation. What the release cannot do is refused, not approximated: several
drops, a drop before layer 0, other position modes, re-ranking turns, per-frame pools (`_check`); several images
or layout tokens inside the image block, fewer than 4 image or 4 following text tokens (at ranking time).
"""

from __future__ import annotations

import torch

from pyramiddrop.scoring import RankInputs, image_block_text, register_scorer

IMAGE_PIVOTS = 4  # the release's pivot_image_token (every script passes 4)
TEXT_PIVOTS = 4  # pivot_text_token


def _check(config) -> None:
    """Config-time refusals: each setting the release has no counterpart for."""
    refusals = (
        (
            len(config.layer_list) > 1 or config.layer_list[:1] == [0],  # no drop (no layers) is no drop
            "is DART as released: one drop before layer K >= 1 (the release's pruned_layer, default 2), its pivots "
            "and features read from layer K-1 (e.g. layer_list=[2], image_token_ratio_list=[0.25], "
            f"position_mode='original'); got layer_list={config.layer_list}.",
        ),
        (
            config.position_mode != "original",
            "keeps the original positions of the kept tokens, as DART's release does; pass position_mode='original'.",
        ),
        (
            config.conversation != "keep",
            "ranks with the layer before the drop, whose input is not stored between turns; use conversation='keep'.",
        ),
        (
            config.video_pool != "sample",
            "selects from a sample's whole block of visual tokens at once, as its release does; use "
            "video_pool='sample'.",
        ),
        (
            config.query != "last",
            "has no query row (its text pivots are the tokens after the image); leave query='last'.",
        ),
    )
    for refused, reason in refusals:
        if refused:
            raise ValueError(f"method 'dart' {reason}")


def _image_block_and_text(inputs: RankInputs, dropping: torch.Tensor) -> torch.Tensor:
    """The text after each sample's image ([B, L] bool), after checking the sample is what the release ranks."""
    rows = dropping.nonzero().flatten().tolist()
    visual = inputs.visual_mask
    text = image_block_text("dart", visual, inputs.attention_mask, inputs.query_mask, rows)
    for row in rows:
        count, num_text = int(visual[row].sum()), int(text[row].sum())
        if count < IMAGE_PIVOTS or num_text < TEXT_PIVOTS:
            raise ValueError(
                f"method 'dart' picks {IMAGE_PIVOTS} image pivots and {TEXT_PIVOTS} text pivots among the tokens after "
                f"the image; sample {row} has {count} visual tokens and {num_text} text tokens after them."
            )
    return text


def _key_l1_norms(inputs: RankInputs) -> torch.Tensor:
    """L1 norm of each token's keys in the layer before the drop, after RoPE, over all heads ([B, L] float32).

    The release reads them after `repeat_kv` (eager, SDPA) or before (FlashAttention 2): the same order of tokens.
    """
    layer, hidden = inputs.layer, inputs.hidden_states
    attention = layer.self_attn
    key = attention.k_proj(layer.input_layernorm(hidden))
    key = key.view(*hidden.shape[:2], -1, attention.head_dim).transpose(1, 2)
    if hasattr(attention, "k_norm"):  # Qwen3- and Gemma-style per-head norms sit before RoPE
        key = attention.k_norm(key)
    key = inputs.apply_rope(key, *inputs.position_embeddings)
    return key.float().abs().sum(dim=(1, 3))


def _pivot_order(pivots: torch.Tensor, sequence_index: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """The pivots of each row in the order the release visits them: `for item in list(indices_set)` over
    `set(image_indices + query_indices)`, CPython's order of a set of sequence indices (not score order)."""
    keys = sequence_index.gather(1, pivots).tolist()
    order = pivots.clone()
    for row in rows:
        slot_of = dict(zip(keys[row], pivots[row].tolist()))
        order[row] = torch.tensor([slot_of[key] for key in list(set(keys[row]))], device=pivots.device)
    return order


@register_scorer("dart", check=_check, ranks_layer_before=True)
def dart_scores(inputs: RankInputs) -> torch.Tensor:
    """Minus the order in which the release adds each image token (unpicked ones last): the engine's top `keep`."""
    if inputs.final_norm is None:
        raise ValueError(
            "method 'dart' compares tokens through the language model's final norm (`.norm`); this "
            "language model has none."
        )
    visual = inputs.visual_mask
    batch, length = visual.shape
    group = inputs.group_index.masked_fill(inputs.group_index < 0, 0).max(1).values  # one group per sample
    keep = torch.where(visual.any(1), inputs.keep[group], 0)
    dropping = keep < visual.sum(1)
    text = _image_block_and_text(inputs, dropping)
    norms = _key_l1_norms(inputs)
    image_pivots = norms.masked_fill(~visual, float("-inf")).topk(min(IMAGE_PIVOTS, length), dim=1).indices
    text_pivots = norms.masked_fill(~text, float("-inf")).topk(min(TEXT_PIVOTS, length), dim=1).indices
    sequence_index = inputs.attention_mask.long().cumsum(1) - 1  # the index in the sample alone, unpadded
    pivots = _pivot_order(
        torch.cat([image_pivots, text_pivots], 1), sequence_index, dropping.nonzero().flatten().tolist()
    )

    features = torch.nn.functional.normalize(inputs.final_norm(inputs.boundary_states).float(), dim=-1)
    pivot_features = features.gather(1, pivots[..., None].expand(-1, -1, features.shape[-1]))
    similarity = torch.einsum("bpd,bld->bpl", pivot_features, features)  # [B, pivots, L]

    picks = ((keep - IMAGE_PIVOTS).clamp(min=0) + IMAGE_PIVOTS + TEXT_PIVOTS - 1) // (IMAGE_PIVOTS + TEXT_PIVOTS)
    picks = torch.where(dropping, picks, 0)  # TOKEN_TOPK = ceil((keep - 4) / 8); a row that keeps all needs none
    most = int(picks.max()) if batch else 0
    unpicked = length * (IMAGE_PIVOTS + TEXT_PIVOTS + 1)
    order = torch.full((batch, length), unpicked, dtype=torch.long, device=visual.device)
    order.scatter_(1, image_pivots, torch.arange(image_pivots.shape[1], device=visual.device).expand_as(image_pivots))
    order.masked_fill_(~visual, unpicked)  # a row with fewer visual tokens than pivots
    remaining = visual & (order == unpicked)
    step = torch.arange(most, device=visual.device)
    for turn in range(pivots.shape[1] if most else 0):
        unlike = (-similarity[:, turn]).masked_fill(~remaining, float("-inf"))
        top = unlike.topk(min(most, length), dim=1)
        taken = (step[: top.indices.shape[1]] < picks[:, None]) & (top.values > float("-inf"))
        rank = IMAGE_PIVOTS + turn * picks[:, None] + step[: top.indices.shape[1]]
        order.scatter_(1, top.indices, torch.where(taken, rank, order.gather(1, top.indices)))
        remaining.scatter_(1, top.indices, remaining.gather(1, top.indices) & ~taken)
    return -order.float()
