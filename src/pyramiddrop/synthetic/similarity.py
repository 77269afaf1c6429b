"""How alike a scene's background tokens are, against its object tokens (issue 34's statistic).

Diversity-based pruning (DivPrune, the diverse half of VisPruner) keeps the tokens least like the others. When
the background's tokens are near-duplicates, as on flat single-shade scenes, the most diverse tokens are the
objects' by construction, and such a method looks better than it would on natural images. The statistic: per
scene, the mean pairwise cosine similarity of the projected visual tokens (what the language model and the
pruning methods see) among background patches, and among object patches; a testbed is fair to diversity when
the first is no larger than the second.
"""

from __future__ import annotations

import torch

from pyramiddrop.synthetic.data import Example
from pyramiddrop.synthetic.patches import patch_owners


def mean_pairwise_cosine(tokens: torch.Tensor) -> float:
    """Mean cosine similarity over all pairs of distinct rows of `tokens` (n, dim), n >= 2."""
    if len(tokens) < 2:
        raise ValueError(f"a pairwise mean needs at least two tokens, got {len(tokens)}")
    unit = torch.nn.functional.normalize(tokens.double(), dim=-1)
    gram = unit @ unit.T
    n = len(tokens)
    return float((gram.sum() - gram.diagonal().sum()) / (n * (n - 1)))


@torch.no_grad()
def projected_tokens(model, processor, examples: list[Example]) -> list[torch.Tensor]:
    """The visual tokens the language model receives for each example's image, (patches, hidden) each."""
    pixels = processor.image_processor([e.image() for e in examples], return_tensors="pt")["pixel_values"]
    config = model.config
    out = model.get_image_features(
        pixel_values=pixels.to(model.dtype),
        vision_feature_layer=config.vision_feature_layer,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
    )
    features = out.pooler_output if hasattr(out, "pooler_output") else out
    return [f.float() for f in features]


def background_and_object_similarity(
    model, processor, examples: list[Example], batch_size: int = 25
) -> tuple[list[float], list[float]]:
    """(background, object) mean pairwise cosine per scene; an object patch is one an object covers at least
    `MIN_COVER` of (as stage 1 labels it), every other patch is background."""
    background, objects = [], []
    for start in range(0, len(examples), batch_size):
        batch = examples[start : start + batch_size]
        for example, tokens in zip(batch, projected_tokens(model, processor, batch)):
            on_object = patch_owners(example.scene) >= 0
            background.append(mean_pairwise_cosine(tokens[~on_object]))
            objects.append(mean_pairwise_cosine(tokens[on_object]))
    return background, objects
