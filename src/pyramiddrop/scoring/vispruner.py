"""`vispruner`: VisPruner as released (Theia-4869/VisPruner, arXiv 2412.01818, `LlavaMetaForCausalLM.encode_images`
in `llava/model/llava_arch.py`, commit aefa01ad), one drop before the language model.

The release, per image of LLaVA-1.5 (CLIP tower, feature layer -2, CLS left out), keeping T of its N patches:
- important tokens: the `int(T * important_ratio)` patches (`important_ratio` 0.5, its default) with the largest
  attention from the CLS token in the feature layer, mean over heads (`vision_attention.py` recomputes that row);
- diverse tokens: the other patches, in that attention order, lose the most duplicated of them in rounds until
  `T - int(T * important_ratio)` remain: each round splits the current list into its even and odd entries,
  scores every even entry by its largest cosine similarity to an odd entry (on the tower's features, what the
  projector reads) and removes the `min(8, R - T_div)` highest, keeping the rest of the even entries in that score
  order before the odd ones.

What differs here: float32 instead of the release's fp16; ties (equal attention or equal similarity, e.g. padded
patches) are broken by order, where the release's CUDA argsort leaves them unspecified; and a round whose even
half is shorter than the count to remove (a few tokens left, fewer than 8 to keep), where the release's index
arithmetic (`R // 2 - r`) raises or empties the list, removes the even half it has. Refused, as the release has no
counterpart: a drop other than one before layer 0, original positions (the release renumbers), several images per
sample, towers without CLS, other feature strategies or layers (`vision_attention.py`), re-ranking turns.
"""

from __future__ import annotations

import torch

from pyramiddrop.scoring import RankInputs, register_scorer

IMPORTANT_RATIO = 0.5  # the release's --important_ratio default
ROUND = 8  # tokens removed per matching round (the release's `min(8, ...)`)


def check_pre_llm_release(config, method: str, release: str) -> None:
    """Config-time refusals shared by methods whose release drops once before the language model."""
    refusals = (
        (
            config.layer_list != [0],
            f"drops once, before the language model, as {release} does: use layer_list=[0] (e.g. "
            f"image_token_ratio_list=[0.25]); got layer_list={config.layer_list}.",
        ),
        (
            config.position_mode != "compact",
            f"renumbers the kept tokens' positions as {release} does (it rebuilds the input); use "
            "position_mode='compact'.",
        ),
        (
            config.conversation != "keep",
            f"selects once, from the first prompt, as {release} does; use conversation='keep'.",
        ),
    )
    for refused, reason in refusals:
        if refused:
            raise ValueError(f"method {method!r} {reason}")


def _check(config) -> None:
    check_pre_llm_release(config, "vispruner", "VisPruner's release")


def diverse_survivors(features: torch.Tensor, residual: torch.Tensor, count: int) -> torch.Tensor:
    """The release's matching rounds: which of `residual` (indices into `features`, normalised rows) remain once
    `count` are left."""
    while count > 0:
        remove = min(ROUND, residual.numel() - count)
        if remove <= 0:
            break
        tokens = features[residual]
        similarity = (tokens[0::2] @ tokens[1::2].T).max(dim=-1).values
        distinct = similarity.sort(descending=True, stable=True).indices[remove:]
        residual = torch.cat([residual[0::2][distinct], residual[1::2]])
    return residual


def vispruner_selection(attention: torch.Tensor, features: torch.Tensor, keep: int) -> torch.Tensor:
    """The indices the release keeps of one image's patches (`attention`: [N]; `features`: [N, C])."""
    important = int(keep * IMPORTANT_RATIO)
    order = attention.sort(descending=True, stable=True).indices
    normalized = features / features.norm(dim=-1, keepdim=True)
    diverse = diverse_survivors(normalized, order[important:], keep - important)
    return torch.cat([order[:important], diverse])


@register_scorer("vispruner", check=_check, vision_attention=True, vision_features=True)
def vispruner_scores(inputs: RankInputs) -> torch.Tensor:
    """1 for the tokens the release keeps in each group (one image), 0 for the others: the top `keep[g]` are its set."""
    if inputs.vision_scores is None or inputs.vision_features is None:
        raise ValueError(
            "method 'vispruner' ranks by the vision tower's attention and features, which this call did not compute: "
            "pass pixel_values in the prefill (not pre-encoded image features)."
        )
    scores = torch.zeros(inputs.group_index.shape, dtype=torch.float32, device=inputs.group_index.device)
    attention, features = inputs.vision_scores.float(), inputs.vision_features.float()
    for group in range(int(inputs.keep.numel())):
        rows, columns = (inputs.group_index == group).nonzero(as_tuple=True)  # sequence order: the patch order
        kept = vispruner_selection(attention[rows, columns], features[rows, columns], int(inputs.keep[group]))
        scores[rows[kept], columns[kept]] = 1.0
    return scores
