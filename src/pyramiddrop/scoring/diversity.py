"""Diversity: keep visual tokens that are unlike each other, from the tokens' own features (no attention).

`pivot-duplication` keeps the tokens least similar to a few pivots (an idea from DART, arXiv 2502.11494, not DART:
`dart.py` is DART as released); `divprune` (DivPrune, arXiv 2503.02175) solves the max-min diversity problem
greedily over the whole pool.
"""

from __future__ import annotations

import torch

from pyramiddrop.scoring import RankInputs, register_scorer, within_group_index


@register_scorer("pivot-duplication")
def duplication_scores(inputs: RankInputs, num_pivots: int = 8) -> torch.Tensor:
    """Keep the visual tokens least similar to a few pivots (no attention needed); what this project called
    `dart` before issue 33, kept under a name that does not claim DART.

    Pivots are the 8 visual tokens with the largest L2 norm of the next layer's keys (before RoPE); they are
    always kept, the others score by minus their largest cosine similarity (raw hidden states) to any pivot, so
    the globally least duplicated tokens survive. DART as released (`dart`) differs in every one of these: 4 image
    and 4 text pivots by the L1 norm of the previous layer's keys after RoPE, features through the final norm,
    and each pivot in turn taking its own least similar tokens.
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


@register_scorer("divprune")
def divprune_scores(inputs: RankInputs) -> torch.Tensor:
    """DivPrune: greedy max-min diversity over each group's visual tokens (cosine distance of their features).

    The first token is the one farthest from its nearest neighbour; each next one is the token farthest from
    everything selected so far. Scores fall with the selection order, so the top `keep[g]` of a group are
    exactly its first `keep[g]` greedy picks. Before the first decoder layer (`layer_list=[0]`) the features
    are the projected visual tokens, as in the paper.
    """
    within, size = within_group_index(inputs)
    visual = within >= 0
    num_groups, width = int(size.numel()), int(size.max()) if size.numel() else 0
    features = torch.nn.functional.normalize(inputs.hidden_states.float(), dim=-1)
    padded = features.new_zeros(num_groups, width, features.shape[-1])
    padded[inputs.group_index[visual], within[visual]] = features[visual]
    valid = torch.arange(width, device=size.device)[None] < size[:, None]  # [G, M]
    distance = 1.0 - padded @ padded.transpose(1, 2)  # [G, M, M]
    distance = distance.masked_fill(~valid[:, None, :], float("inf"))
    eye = torch.eye(width, dtype=torch.bool, device=size.device)
    nearest = distance.masked_fill(eye, float("inf")).min(dim=-1).values  # step 0: the most isolated token
    candidate = torch.where(valid, nearest, float("-inf"))
    groups = torch.arange(num_groups, device=size.device)
    order = torch.full((num_groups, width), width, dtype=torch.long, device=size.device)
    closest = torch.full((num_groups, width), float("inf"), device=size.device)
    for step in range(int(inputs.keep.max()) if num_groups else 0):
        pick = candidate.argmax(dim=-1)  # [G]
        fresh = candidate[groups, pick] > float("-inf")  # a group with every token picked runs on idle
        order[groups, pick] = torch.where(fresh, step, order[groups, pick])
        closest = torch.minimum(closest, distance[groups, :, pick])
        candidate = torch.where(valid & (order == width), closest, float("-inf"))
    scores = torch.zeros(inputs.group_index.shape, dtype=torch.float32, device=size.device)
    scores[visual] = (width - order[inputs.group_index[visual], within[visual]]).float()
    return scores
