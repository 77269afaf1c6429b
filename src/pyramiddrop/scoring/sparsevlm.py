"""`sparsevlm`: SparseVLM as released (arXiv 2410.04417); `sparsevlm-norecycle`: the same without token recycling.

Oracle: Gumpest/SparseVLMs at b9619e61 (tag v1.5, the code of the ICML version; unchanged since the merge 8435974
of 2025-03-06): `LlamaDynamicvitModel.forward` in `llava/model/language_model/modelling_sparse_llama.py`,
`attn_postprocess_topk` in `score.py`, `cluster_and_merge` in `utils.py`, the attention rows of
`LlamaDynamicvitFlashAttention2.forward`. On one sample with one image block the release:
- picks the text raters once, from the language model's input: `m = softmax_text(v @ t^T)` averaged over the visual
  tokens `v`, with `t` every token after the image; a text token rates when its `m` is above the mean of `m`;
- at each pruning layer (0-based 2, 6 and 15: drops before layers 3, 7 and 16) computes that layer's causal attention
  on its input, averages it over heads and over the raters' rows, and keeps the top `min(count, V - 1)` visual tokens
  (`count` from its per-budget table, `V` the visual tokens alive); text is never dropped; positions are renumbered
  without gaps (`position_ids[:, :n]`; decoding continues each layer's own cache length);
- recycles: the `int(0.3 * deleted) + 1` deleted tokens with the highest score are clustered (density peaks) into
  `int(n / 10) + 1` mean tokens placed after the kept visual tokens, which later layers rank as visual tokens.

Here the count is the engine's `int(N * ratio)` (`PyramidDropConfig.sparsevlm` gives the release's table for its
576-token LLaVA-1.5 budgets) and the engine selects the recycled tokens too (`methods.sparsevlm_recycled`): each mean lives in its
cluster center's slot, moved after the kept visual tokens (`recycle`). Left out: the release's random tie noise in
the clustering (fixed here, `density_peak_clusters`); where `count >= V` the release still drops and recycles one
token and the engine keeps all. The v1.0 release (91fb6d98, 2024-10-05) kept `int(rank * scale + bias)` tokens with
`rank` the matrix rank of the raters' attention: not this engine's fixed counts, and replaced by the table in v1.5.
Scores are float32 (the release: the model's dtype, no GQA expansion).
"""

from __future__ import annotations

import dataclasses

import torch

from pyramiddrop.methods import sparsevlm_recycled
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
            raise ValueError(f"method {config.method!r} {reason}")


def text_raters(
    embeds: torch.Tensor, attention_mask: torch.Tensor, pool: torch.Tensor, query_mask: torch.Tensor
) -> torch.Tensor:
    """The release's text raters ([B, L] float, 1 for a rater), from the language model's input embeddings: of the
    tokens after the image (up to the prompt's end), those whose softmax-over-text similarity to the visual tokens,
    averaged over the visual tokens, is above its mean. In the input's dtype, as the release computes it."""
    rows = pool.any(1).nonzero().flatten().tolist()
    text = image_block_text("sparsevlm", pool, attention_mask, query_mask, rows)
    raters = torch.zeros(pool.shape, dtype=torch.float32, device=pool.device)
    for row in rows:
        similarity = (embeds[row, pool[row]] @ embeds[row, text[row]].T).softmax(1).mean(0)
        rates = similarity > similarity.mean()
        if not bool(rates.any()):
            raise ValueError(
                "SparseVLM (method 'sparsevlm' or 'sparsevlm-norecycle') rates the image with the text tokens after "
                f"it whose similarity to it is above their mean; sample {row} has {int(text[row].sum())} text tokens "
                "after its image and none is (it needs at least two different text tokens after the image: put the "
                "question after it)."
            )
        raters[row, text[row].nonzero().flatten()[rates]] = 1.0
    return raters


def _relation(inputs: RankInputs, method: str) -> torch.Tensor:
    """Head-mean attention of the raters' rows in the layer before the drop, averaged over the raters ([B, L])."""
    if inputs.input_prior is None:
        raise ValueError(
            f"method {method!r} picks its raters from the language model's input embeddings, which this front end does "
            "not capture; use pyramiddrop with transformers."
        )
    raters = inputs.input_prior.bool() & inputs.attention_mask
    return attention_scores(dataclasses.replace(inputs, query_mask=raters))


@register_scorer("sparsevlm-norecycle", check=_check, ranks_layer_before=True, input_prior=text_raters)
def sparsevlm_norecycle_scores(inputs: RankInputs) -> torch.Tensor:
    """The raters' attention: the engine keeps its top `int(N * ratio)`."""
    return _relation(inputs, "sparsevlm-norecycle")


def density_peak_clusters(tokens: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Density-peak clustering of `tokens` [n, C] into `count` clusters (the release's `cluster_and_merge`): the
    centers in the order they are chosen and each token's cluster.

    The release adds `torch.rand(n) * 1e-6` to the densities to break ties, which are common (two mutual nearest
    neighbours have the same density when `count` is 2; every token has density 1 when it is 1). Here that draw is
    fixed, `(n - 1 - i) / n` for the i-th token: an earlier (better rated) token wins a tie, the same on every run.
    """
    distance = (tokens[:, None] - tokens[None]).norm(dim=-1) / tokens.shape[-1] ** 0.5
    nearest = distance.topk(count, dim=-1, largest=False).values
    density = (-(nearest**2).mean(-1)).exp()
    draw = torch.arange(len(tokens) - 1, -1, -1, device=tokens.device, dtype=density.dtype) / len(tokens)
    density = density + draw * 1e-6
    denser = (density[None, :] > density[:, None]).to(distance.dtype)
    to_denser = (distance * denser + distance.max() * (1 - denser)).min(-1).values
    centers = (to_denser * density).topk(count).indices
    cluster = distance[centers].argmin(0)
    cluster[centers] = torch.arange(count, device=tokens.device)
    return centers, cluster


def _recycling(inputs: RankInputs) -> tuple[torch.Tensor, list]:
    """The raters' attention and, per dropping row, what the release recycles: the slots of the deleted tokens that
    are clustered (the highest-rated 30%, in rating order), their clusters, and the slots of the cluster centers,
    which carry the merged tokens."""
    relation = _relation(inputs, "sparsevlm")
    visual = inputs.visual_mask
    group = inputs.group_index.masked_fill(inputs.group_index < 0, 0).max(1).values  # one group per sample
    keep = torch.where(visual.any(1), inputs.keep[group], 0)
    count = visual.sum(1)
    extra = [sparsevlm_recycled(k, a) for k, a in zip(keep.tolist(), count.tolist())]
    plans = []
    for row in range(visual.shape[0]):
        if int(keep[row]) >= int(count[row]):
            plans.append(None)
            continue
        slots = visual[row].nonzero().flatten()
        rating = relation[row, slots]
        kept = torch.zeros_like(slots, dtype=torch.bool)
        kept[rating.topk(int(keep[row])).indices] = True
        deleted = slots[~kept]
        candidates = deleted[rating[~kept].topk(int(deleted.numel() * 0.3) + 1).indices]
        features = inputs.boundary_states[row, candidates]
        centers, cluster = density_peak_clusters(features, int(extra[row]))
        plans.append((candidates, cluster, candidates[centers], slots.max()))
    return relation, plans


def recycle(inputs: RankInputs, selected: torch.Tensor, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each center's slot takes its cluster's mean (weighted as the release: `x * (1 / (size + 1e-6))` summed), with
    gradient, and moves after the sample's kept visual tokens in the order the centers were chosen. The plan is
    recomputed from the inputs (the scorer and the merge share no state)."""
    _, plans = _recycling(inputs)
    merged = hidden.clone()
    order = torch.arange(hidden.shape[1], device=hidden.device, dtype=torch.float64).expand(hidden.shape[:2]).clone()
    for row, plan in enumerate(plans):
        if plan is None:
            continue
        candidates, cluster, carriers, last_visual = plan
        weight = 1 / (torch.bincount(cluster, minlength=carriers.numel()).to(hidden.dtype) + 1e-6)
        weighted = hidden[row, candidates] * weight[cluster, None]
        merged[row, carriers] = hidden.new_zeros(carriers.numel(), hidden.shape[-1]).index_add(0, cluster, weighted)
        step = torch.arange(1, carriers.numel() + 1, device=hidden.device, dtype=torch.float64)
        order[row, carriers] = last_visual + step / (carriers.numel() + 1)
    return merged, order


@register_scorer(
    "sparsevlm",
    check=_check,
    merge=recycle,
    ranks_layer_before=True,
    input_prior=text_raters,
)
def sparsevlm_scores(inputs: RankInputs) -> torch.Tensor:
    """The raters' attention, lifted for the cluster centers: the engine keeps the top `keep` and the centers."""
    relation, plans = _recycling(inputs)
    for row, plan in enumerate(plans):
        if plan is not None:
            relation[row, plan[2]] = relation[row].max() + 1
    return relation
