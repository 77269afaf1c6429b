"""`fastv`: FastV as released (pkunlp-icler/FastV, arXiv 2403.06764): one drop before layer K, ranked by the
attention map computed inside layer K-1, the last layer before the drop.

Released FastV turns `output_attentions` on for layer K-1 only, averages its map over heads, reads the last
token's row at the image columns, keeps the top `ATTENTION_RANK` image tokens and gives every kept token its
original position. Here layer K-1's map is recomputed from that layer's own input (its norm, q and k
projections and rotary embedding) for the query row only, exactly what `pdrop` computes for layer K: so eager,
SDPA and FlashAttention models rank alike. `pdrop` with one boundary is PyramidDrop's rule with one drop (it
ranks with layer K's attention), which is not FastV.
"""

from __future__ import annotations

import torch

from pyramiddrop.scoring import RankInputs, register_scorer
from pyramiddrop.scoring.attention import attention_scores


def _check(config) -> None:
    if len(config.layer_list) != 1 or config.layer_list[0] < 1:
        raise ValueError(
            "method 'fastv' is FastV as released: one drop before layer K >= 1, ranked with the attention of layer "
            f"K-1 (e.g. layer_list=[2], image_token_ratio_list=[0.5]); got layer_list={config.layer_list}. For "
            "several drops use method='pdrop'."
        )
    if config.position_mode != "original":
        raise ValueError(
            "method 'fastv' keeps the original positions of the kept tokens, as FastV's release does; pass "
            "position_mode='original' (PyramidDropConfig.fastv(k, keep_ratio) sets it)."
        )
    if config.conversation != "keep":
        raise ValueError(
            "method 'fastv' ranks with the layer before the drop, whose input is not stored between turns; use "
            "conversation='keep'."
        )


@register_scorer("fastv", check=_check, ranks_layer_before=True)
def fastv_scores(inputs: RankInputs) -> torch.Tensor:
    """Head-mean attention of the query row in layer K-1 (the engine hands over that layer and its input)."""
    return attention_scores(inputs)
