"""Pictures of what PyramidDrop keeps: the image with each stage's kept patches, one panel per stage; for a video,
a frame strip (one row per stage, one column per frame)."""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

from pyramiddrop.api import get_drop_record
from pyramiddrop.tools.inputs import build_inputs


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


def _shade(picture: np.ndarray, cells: np.ndarray) -> np.ndarray:
    """Darken the patches of `picture` whose cell in the token grid `cells` (bool, rows x cols) is False."""
    rows, cols = cells.shape
    shade = np.kron(~cells, np.ones((math.ceil(picture.shape[0] / rows), math.ceil(picture.shape[1] / cols))))
    return picture * (1 - 0.75 * shade[: picture.shape[0], : picture.shape[1], None])


def show_kept_tokens(model, processor, image: Image.Image, prompt: str, path: str) -> list[list[int]]:
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
            axis = axes[grid_index][stage]
            axis.imshow(_shade(picture, cells))
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


def show_video_kept_tokens(
    model, inputs: dict, frames: list[Image.Image], path: str, grid: tuple[int, int] | None = None
) -> list[list[int]]:
    """Run one prefill on `inputs` (a processor's output with one video) and draw the frame strip of sample 0.

    `grid` is a frame's token grid (rows, cols); by default Qwen's `video_grid_thw` (after the spatial merge),
    else a square. Returns the kept counts per stage and frame.
    """
    with torch.no_grad():
        model(**inputs, logits_to_keep=1)
    if grid is None and inputs.get("video_grid_thw") is not None:
        merge = model.config.vision_config.spatial_merge_size
        grid = tuple(int(v) // merge for v in inputs["video_grid_thw"][0, 1:])
    return draw_frame_strip(get_drop_record(model), frames, path, grid)


def draw_frame_strip(
    record, frames: list[Image.Image], path: str, grid: tuple[int, int] | None = None, sample: int = 0
) -> list[list[int]]:
    """A video's kept tokens as a strip: one row per stage, one column per frame, kept patches bright.

    Frames are the model's video frames (`record.visual_frame_index`); when the model merges several input
    frames into one (Qwen: 2 per temporal patch), the first frame of each group is drawn.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frame_of = record.visual_frame_index[sample]
    num_frames = int(frame_of.max()) + 1 if frame_of.numel() else 0
    if num_frames == 0:
        raise ValueError(f"sample {sample} has no video tokens; draw images with show_kept_tokens.")
    tokens = [(frame_of == frame).nonzero()[:, 0] for frame in range(num_frames)]
    if grid is None:
        side = math.isqrt(len(tokens[0]))
        if side * side != len(tokens[0]):
            raise ValueError(f"a frame's {len(tokens[0])} tokens do not form a square; pass grid=(rows, cols).")
        grid = (side, side)
    pictures = [
        np.asarray(frames[frame * len(frames) // num_frames].convert("RGB"), dtype=np.float64) / 255.0
        for frame in range(num_frames)
    ]
    stages = record.kept_visual_indices[sample]
    figure, axes = plt.subplots(len(stages), num_frames, figsize=(1.6 * num_frames, 1.7 * len(stages)), squeeze=False)
    counts = []
    for stage, kept in enumerate(stages):
        kept_set = torch.zeros(record.num_visual_tokens[sample], dtype=torch.bool)
        kept_set[kept] = True
        stage_counts = []
        for frame, (indices, picture) in enumerate(zip(tokens, pictures)):
            cells = kept_set[indices].view(*grid).numpy()
            axis = axes[stage][frame]
            axis.imshow(_shade(picture, cells))
            axis.set_xticks([])
            axis.set_yticks([])
            stage_counts.append(int(cells.sum()))
            if stage == 0:
                axis.set_title(f"frame {frame}", fontsize=8)
            if frame == 0:
                axis.set_ylabel(f"stage {stage}: {len(kept)}", fontsize=8)
        counts.append(stage_counts)
    figure.suptitle("kept video tokens (bright) per stage and frame", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return counts
