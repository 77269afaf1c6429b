"""`visionzip`: VisionZip's dominant tokens (arXiv 2412.04467), ranked by the vision encoder's own attention.

The score of a visual token is the attention its patch receives in the vision tower's feature layer: from the
CLS token in CLIP-style towers, averaged over all patches where there is no CLS. The engine captures it while
the tower runs (`pyramiddrop.vision_attention`), so the ranking needs nothing from the language model and
belongs before its first layer (`layer_list=[0]`). VisionZip also merges the rest into a few contextual
tokens; this is its dominant-token selection only.
"""

from __future__ import annotations

import torch

from pyramiddrop.scoring import RankInputs, register_scorer


@register_scorer("visionzip", vision_attention=True)
def vision_attention_scores(inputs: RankInputs) -> torch.Tensor:
    if inputs.vision_scores is None:
        raise ValueError(
            "method 'visionzip' ranks by the vision tower's attention, which this call did not compute: pass "
            "pixel_values in the prefill (not pre-encoded image features)."
        )
    return inputs.vision_scores
