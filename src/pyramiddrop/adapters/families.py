"""The supported families, one declaration each (docs/adapters.md explains every field)."""

from __future__ import annotations

import math

from pyramiddrop.adapters.base import ModelAdapter
from pyramiddrop.adapters.checks import (
    causal_attention_without_softcapping,
    deepstack_before_first_drop,
    rotary_language_model,
)
from pyramiddrop.adapters.layout import NewlineEmbedding, TokenAfterEachRow
from pyramiddrop.adapters.masks import ImageBlocks
from pyramiddrop.adapters.positions import MRopePositions
from pyramiddrop.adapters.video import FixedSizeFrames, GridCornerFrames
from pyramiddrop.vision_attention import llava_vision_attention

IMAGE_AND_VIDEO = ("image_token_id", "video_token_id")
ROPE = (rotary_language_model,)


def _patch_side(config) -> int:
    return config.vision_config.image_size // config.vision_config.patch_size


def onevision_frame_tokens(config) -> int:
    """OneVision pools each frame's patch grid 2x2 by bilinear interpolation, rounding up."""
    return math.ceil(_patch_side(config) / 2) ** 2


def next_video_frame_tokens(config) -> int:
    """LLaVA-NeXT-Video pools each frame's patch grid with a `spatial_pool_stride` kernel, rounding down."""
    return (_patch_side(config) // config.spatial_pool_stride) ** 2


def _qwen(family: str, *checks) -> ModelAdapter:
    """Qwen2/2.5/3-VL: image and video placeholders between vision_start / vision_end, 3-D M-RoPE positions (kept
    tokens keep their (time, height, width); decoding continues from the model's own `rope_deltas`), a video frame
    is one temporal patch of the grid."""
    return ModelAdapter(
        family,
        visual_token_keys=IMAGE_AND_VIDEO,
        video_token_key="video_token_id",
        frames=GridCornerFrames(),
        position_ids=MRopePositions(),
        checks=checks,
        vision_tower_name="visual",
    )


# model_type -> adapter. LLaVA-NeXT-style anyres rows end in `image_newline` tokens sharing the image token id.
ADAPTERS: dict[str, ModelAdapter] = {
    "llava": ModelAdapter("LLaVA-1.5", vision_attention=llava_vision_attention),
    "llava_next": ModelAdapter("LLaVA-NeXT", layout=NewlineEmbedding()),
    "llava_onevision": ModelAdapter(
        "LLaVA-OneVision",
        visual_token_keys=IMAGE_AND_VIDEO,
        video_token_key="video_token_id",
        layout=NewlineEmbedding(),  # also the one newline that ends each video
        frames=FixedSizeFrames(onevision_frame_tokens),
    ),
    "llava_next_video": ModelAdapter(
        "LLaVA-NeXT-Video",
        visual_token_keys=IMAGE_AND_VIDEO,
        video_token_key="video_token_id",
        layout=NewlineEmbedding(),  # image rows only: videos have no newline
        frames=FixedSizeFrames(next_video_frame_tokens),
        checks=ROPE,
    ),
    "qwen2_vl": _qwen("Qwen2-VL"),
    "qwen2_5_vl": _qwen("Qwen2.5-VL"),
    "qwen3_vl": _qwen("Qwen3-VL", deepstack_before_first_drop),
    "qwen3_vl_moe": _qwen("Qwen3-VL-MoE", deepstack_before_first_drop),
    # `<img>` + image_seq_length context tokens per tile (and the thumbnail) + `</img>`: the context tokens are
    # the placeholders, `<img>` / `</img>` are ordinary text around them. Video frames are tiles too.
    "internvl": ModelAdapter("InternVL", checks=ROPE),
    # Pixtral: rows of `[IMG]` each ended by `[IMG_BREAK]`, the last by `[IMG_END]` (kept, outside the pool).
    "mistral3": ModelAdapter("Mistral 3", layout=TokenAfterEachRow(), checks=ROPE),
    # Sub-images and the global image, each `<fake_token_around_image><row_i_col_j>` + pixel-shuffled `<image>`
    # placeholders; the text between them is ordinary text. One pool per sample over all sub-images.
    "idefics3": ModelAdapter("Idefics3", checks=ROPE, vision_tower_name="vision_model"),
    "smolvlm": ModelAdapter("SmolVLM", checks=ROPE, vision_tower_name="vision_model"),
    # `<start_of_image>` + soft tokens + `<end_of_image>` per image (and per pan-and-scan crop); the soft tokens of
    # one image attend to each other both ways (prefill with `token_type_ids`), which every later stage keeps for its
    # kept tokens; local (sliding) and global layers have their own rotary bases.
    "gemma3": ModelAdapter(
        "Gemma 3",
        rotary_by_layer_type=True,
        blocks=ImageBlocks(),
        checks=(rotary_language_model, causal_attention_without_softcapping),
    ),
}
