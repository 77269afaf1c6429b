"""Pictures of what PyramidDrop keeps: the image with each stage's kept patches, one panel per stage."""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

from pyramiddrop.api import get_drop_record


def token_grids(num_visual: int, num_layout: int, base_tokens: int | None = None) -> list[tuple[int, int, int]]:
    """How a sample's visual tokens tile the image: `(start, rows, cols)` per grid.

    LLaVA-1.5: one square grid. LLaVA-NeXT: the base image (a square of `base_tokens`) and then the crops'
    combined grid, whose rows each ended with one (never dropped) newline token.
    """
    if base_tokens is None or num_layout == 0:
        side = math.isqrt(num_visual)
        if side * side != num_visual:
            raise ValueError(f"{num_visual} visual tokens do not form a square grid; pass the base token count.")
        return [(0, side, side)]
    side = math.isqrt(base_tokens)
    grids = [(0, side, side)]
    rest = num_visual - base_tokens
    if rest > 0:
        grids.append((base_tokens, num_layout, rest // num_layout))
    return grids


def _denormalize(pixel_values: torch.Tensor, processor) -> np.ndarray:
    image_processor = processor.image_processor
    mean = np.array(getattr(image_processor, "image_mean", [0.5] * 3)).reshape(3, 1, 1)
    std = np.array(getattr(image_processor, "image_std", [0.5] * 3)).reshape(3, 1, 1)
    array = pixel_values.float().cpu().numpy() * std + mean
    return np.clip(array.transpose(1, 2, 0), 0, 1)


def show_kept_tokens(model, processor, image: Image.Image, prompt: str, build_inputs, path: str) -> list[list[int]]:
    """Run one prefill and draw each stage's kept patches; returns the kept counts per stage and grid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    inputs = build_inputs(processor, [image], [prompt])
    with torch.no_grad():
        model(**inputs, logits_to_keep=1)
    record = get_drop_record(model)
    kept_per_stage = record.kept_visual_indices[0]
    pixel_values = inputs["pixel_values"][0]
    base_tokens = None
    if pixel_values.dim() == 4:  # LLaVA-NeXT: [patches, 3, H, W], the first patch is the whole image
        patch = model.config.vision_config.patch_size
        base_tokens = (pixel_values.shape[-1] // patch) ** 2
        pixel_values = pixel_values[0]
    grids = token_grids(record.num_visual_tokens[0], record.num_layout_tokens[0], base_tokens)
    pictures = [_denormalize(pixel_values, processor)]
    if len(grids) > 1:
        _, rows, cols = grids[1]
        pictures.append(np.asarray(image.convert("RGB").resize((cols * 16, rows * 16))) / 255.0)

    figure, axes = plt.subplots(
        len(grids), len(kept_per_stage), figsize=(2.6 * len(kept_per_stage), 2.7 * len(grids)), squeeze=False
    )
    counts = []
    for stage, kept in enumerate(kept_per_stage):
        kept_set = torch.zeros(record.num_visual_tokens[0], dtype=torch.bool)
        kept_set[kept] = True
        stage_counts = []
        for grid_index, ((start, rows, cols), picture) in enumerate(zip(grids, pictures)):
            cells = kept_set[start : start + rows * cols].view(rows, cols).numpy()
            shade = np.kron(~cells, np.ones((math.ceil(picture.shape[0] / rows), math.ceil(picture.shape[1] / cols))))
            shade = shade[: picture.shape[0], : picture.shape[1], None]
            axis = axes[grid_index][stage]
            axis.imshow(picture * (1 - 0.75 * shade))
            axis.set_xticks([])
            axis.set_yticks([])
            stage_counts.append(int(cells.sum()))
            if grid_index == 0:
                axis.set_title(f"stage {stage}: {len(kept)} kept", fontsize=9)
            if stage == 0:
                axis.set_ylabel("base image" if grid_index == 0 and len(grids) > 1 else ("crops" if grid_index else ""))
        counts.append(stage_counts)
    figure.suptitle(f"kept visual tokens (bright) for: {prompt[:60]}", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return counts
