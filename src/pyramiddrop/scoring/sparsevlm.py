"""`sparsevlm-norecycle`: SparseVLM's selection as released, without its token recycling (arXiv 2410.04417).

Oracle: Gumpest/SparseVLMs at b9619e61 (tag v1.5, the code of the ICML version; unchanged since the merge 8435974
of 2025-03-06): `LlamaDynamicvitModel.forward` in `llava/model/language_model/modelling_sparse_llama.py`,
`attn_postprocess_topk` in `score.py`, the attention rows of `LlamaDynamicvitFlashAttention2.forward`. On one sample
with one image block the release:
- picks the text raters once, from the language model's input: `m = softmax_text(v @ t^T)` averaged over the visual
  tokens `v`, with `t` every token after the image; a text token rates when its `m` is above the mean of `m`;
- at each pruning layer (0-based 2, 6 and 15: drops before layers 3, 7 and 16) computes that layer's causal attention
  on its input, averages it over heads and over the raters' rows, and keeps the top `min(count, V - 1)` visual tokens
  (`count` from its per-budget table, `V` the visual tokens alive); text is never dropped; positions are renumbered
  without gaps (`position_ids[:, :n]`; decoding continues each layer's own cache length);
- recycles: the top 30% of the deleted tokens by the same score are clustered (density-peak clustering with random
  tie noise) into `int(n / 10) + 1` tokens placed after the kept visual tokens, which later layers rank with them.

Here the count is the engine's `int(N * ratio)` (`PyramidDropConfig.sparsevlm` gives the release's counts for its
576-token LLaVA-1.5 budgets). Left out, so the name does not claim SparseVLM: the recycling (the engine keeps a
subset of the tokens in their order and cannot insert merged tokens after the kept ones); where `count >= V` the
release still drops one token and the engine keeps all. The v1.0 release (91fb6d98, 2024-10-05) kept
`int(rank * scale + bias)` tokens with `rank` the matrix rank of the raters' attention: not this engine's fixed
counts, and replaced by the table in v1.5. Scores are float32 (the release: the model's dtype, no GQA expansion).
"""

from __future__ import annotations

import dataclasses

import torch

from pyramiddrop.scoring import RankInputs, image_block_text, register_scorer
from pyramiddrop.scoring.attention import attention_scores


def _check(config) -> None:
    """Config-time refusals: each setting the release has no counterpart for."""
    refusals = (
        (
            config.layer_list[:1] == [0],
            "ranks with the attention inside the layer before each drop (the release's pruning layers 2, 6, 15): "
            f"layer_list entries must be >= 1, got {config.layer_list}.",
        ),
        (
            config.position_mode != "compact",
            "renumbers positions without gaps after each drop, as its release does; leave position_mode='compact'.",
        ),
        (
            config.conversation != "keep",
            "ranks with the layers before the drops, whose inputs are not stored between turns; use "
            "conversation='keep'.",
        ),
        (
            config.video_pool != "sample",
            "ranks a sample's one block of visual tokens, as its release does; use video_pool='sample'.",
        ),
        (config.query != "last", "ranks with its own text raters, not a query row; leave query='last'."),
    )
    for refused, reason in refusals:
        if refused:
            raise ValueError(f"method 'sparsevlm-norecycle' {reason}")


def text_raters(
    embeds: torch.Tensor, attention_mask: torch.Tensor, pool: torch.Tensor, query_mask: torch.Tensor
) -> torch.Tensor:
    """The release's text raters ([B, L] float, 1 for a rater), from the language model's input embeddings: of the
    tokens after the image (up to the prompt's end), those whose softmax-over-text similarity to the visual tokens,
    averaged over the visual tokens, is above its mean. In the input's dtype, as the release computes it."""
    rows = pool.any(1).nonzero().flatten().tolist()
    text = image_block_text("sparsevlm-norecycle", pool, attention_mask, query_mask, rows)
    raters = torch.zeros(pool.shape, dtype=torch.float32, device=pool.device)
    for row in rows:
        similarity = (embeds[row, pool[row]] @ embeds[row, text[row]].T).softmax(1).mean(0)
        rates = similarity > similarity.mean()
        if not bool(rates.any()):
            raise ValueError(
                f"method 'sparsevlm-norecycle' rates the image with the text tokens after it whose similarity to it is "
                f"above their mean; sample {row} has {int(text[row].sum())} text tokens after its image and none is "
                "(SparseVLM needs at least two different text tokens after the image: put the question after it)."
            )
        raters[row, text[row].nonzero().flatten()[rates]] = 1.0
    return raters


@register_scorer("sparsevlm-norecycle", check=_check, ranks_layer_before=True, input_prior=text_raters)
def sparsevlm_scores(inputs: RankInputs) -> torch.Tensor:
    """Head-mean attention of the raters' rows in the layer before the drop, averaged over the raters."""
    if inputs.input_prior is None:
        raise ValueError(
            "method 'sparsevlm-norecycle' picks its raters from the language model's input embeddings, which this "
            "front end does not capture; use pyramiddrop with transformers."
        )
    raters = inputs.input_prior.bool() & inputs.attention_mask
    return attention_scores(dataclasses.replace(inputs, query_mask=raters))
