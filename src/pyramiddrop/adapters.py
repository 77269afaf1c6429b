"""Per-family adapters: what differs between vision-language models (where the visual tokens are, which
module is the language model, how position ids look and turn into rotary embeddings, how video tokens split
into frames, which settings a family cannot take). The engine knows nothing else.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from pyramiddrop.config import PyramidDropConfig
from pyramiddrop.scoring import rotate_half_rope
from pyramiddrop.vision_attention import VisionAttentionSpec, llava_vision_attention


class ModelAdapter:
    """LLaVA-1.5 layout: the processor expands `<image>` into `image_token_id` placeholders."""

    family = "LLaVA-1.5"
    position_modes: tuple[str, ...] = ("compact", "original")
    position_mode_reason = ""  # why a position mode is missing from `position_modes`
    visual_token_keys: tuple[str, ...] = ("image_token_id",)  # config attributes holding visual placeholder ids
    video_token_key: str | None = None
    # How to read the vision tower's attention per image token (`visionzip`); None where patches do not map one
    # to one onto image tokens (anyres crops, merged patches).
    vision_attention: Callable[[nn.Module], VisionAttentionSpec] | None = staticmethod(llava_vision_attention)

    def language_model(self, model: nn.Module) -> nn.Module:
        return model.get_decoder()

    def validate(self, model: nn.Module, config: PyramidDropConfig) -> None:
        """Apply-time checks of a config against this family; errors say why and what to set instead."""
        if config.position_mode not in self.position_modes:
            reason = f" ({self.position_mode_reason})" if self.position_mode_reason else ""
            raise ValueError(
                f"position_mode={config.position_mode!r} is not valid for {self.family} models{reason}; "
                f"use one of {self.position_modes}, e.g. PyramidDropConfig(..., position_mode="
                f"{self.position_modes[0]!r})."
            )

    def token_mask(
        self, model: nn.Module, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None
    ) -> torch.Tensor | None:
        """Placeholder positions of visual tokens, from the ids or (embeds only) from the placeholder embeddings."""
        token_ids = [getattr(model.config, key) for key in self.visual_token_keys]
        return _placeholder_mask(model, [i for i in token_ids if i is not None], input_ids, inputs_embeds)

    def droppable_mask(self, model: nn.Module, token_mask: torch.Tensor, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """The visual tokens that may be dropped (all of them for LLaVA-1.5)."""
        return token_mask

    def video_mask(
        self, model: nn.Module, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None
    ) -> torch.Tensor | None:
        """Placeholder positions of video tokens (None for families without video)."""
        if self.video_token_key is None:
            return None
        return _placeholder_mask(model, [getattr(model.config, self.video_token_key)], input_ids, inputs_embeds)

    def frame_index(self, model: nn.Module, video_tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Video frame of every droppable video token (`video_tokens`, [batch, seq]); ids unique in the batch, -1
        elsewhere. Read from the sequence itself: `generate()` passes encoder outputs, not the videos' shapes.
        """
        raise NotImplementedError(f"{self.family} has no video input.")

    def positions(
        self, position_ids: torch.Tensor | None, batch: int, past: int, length: int, device: torch.device
    ) -> torch.Tensor:
        """Position ids in the shape the rotary embedding takes: `[batch, seq]`."""
        if position_ids is None:
            position_ids = torch.arange(past, past + length, device=device)[None]
        return position_ids.expand(batch, -1)

    def rotary(
        self, language_model: nn.Module, hidden_states: torch.Tensor, position_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return language_model.rotary_emb(hidden_states, position_ids=position_ids)

    apply_rope = staticmethod(rotate_half_rope)


class LlavaNextAdapter(ModelAdapter):
    """LLaVA-NeXT anyres: the `image_newline` tokens that end each row of the crop grid share the image token id.

    They carry the 2-D layout, not content, so they are never dropped and are left out of the ranked pool;
    the pool of a sample is its base image and crop tokens (all images of the sample together).
    """

    family = "LLaVA-NeXT"
    vision_attention = None  # crops are unpadded and pooled: tower patches and image tokens differ

    def droppable_mask(self, model: nn.Module, token_mask: torch.Tensor, inputs_embeds: torch.Tensor) -> torch.Tensor:
        newline = model.model.image_newline.to(inputs_embeds.dtype)
        is_newline = (inputs_embeds == newline).all(-1)
        return token_mask & ~is_newline


class LlavaOnevisionAdapter(LlavaNextAdapter):
    """LLaVA-OneVision: anyres images as LLaVA-NeXT (newline tokens kept, out of the pool) and videos.

    A video is its frames' pooled patch grids one after another, then one `image_newline` token (kept).
    """

    family = "LLaVA-OneVision"
    visual_token_keys = ("image_token_id", "video_token_id")
    video_token_key = "video_token_id"

    def frame_index(self, model: nn.Module, video_tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Each video's droppable tokens are its frames' grids back to back (its newline ends the run)."""
        side = model.config.vision_config.image_size // model.config.vision_config.patch_size
        per_frame = math.ceil(side / 2) ** 2  # frames are 2x2-pooled (bilinear, rounded up)
        starts = video_tokens & (_run_offsets(video_tokens) % per_frame == 0)
        return _number_frames(video_tokens, starts)


class MRopeAdapter(ModelAdapter):
    """Qwen2-VL / Qwen2.5-VL: image and video placeholder ids, 3-D M-RoPE positions `(3, batch, seq)`.

    Kept tokens keep their original (time, height, width) positions; decoding continues from the positions
    the model derives from its own `rope_deltas`, untouched. A video frame is one temporal patch of the grid.
    """

    position_modes = ("original",)
    vision_attention = None  # the merger fuses 2x2 patches after windowed attention
    position_mode_reason = (
        "positions are 3-D M-RoPE (time, height, width): a visual token's position is its place in the image "
        "grid and the text after an image continues from the grid's extent, so there is no sound renumbering "
        "of kept tokens; they keep their original positions"
    )
    visual_token_keys = ("image_token_id", "video_token_id")
    video_token_key = "video_token_id"
    rope_axes = 3

    def __init__(self, family: str) -> None:
        self.family = family

    def positions(
        self, position_ids: torch.Tensor | None, batch: int, past: int, length: int, device: torch.device
    ) -> torch.Tensor:
        """`[3, batch, seq]`; a leading text row (`[4, batch, seq]`, used by transformers for packing) is cut."""
        if position_ids is None:
            position_ids = torch.arange(past, past + length, device=device)
        if position_ids.dim() < 3:
            position_ids = position_ids.view(1, -1, position_ids.shape[-1])
        elif position_ids.shape[0] == self.rope_axes + 1:
            position_ids = position_ids[1:]
        return position_ids.expand(self.rope_axes, batch, -1)

    def frame_index(self, model: nn.Module, video_tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Every frame of a video covers the same (height, width) grid of positions, so a frame starts wherever a
        run of video tokens returns to the run's top-left (height, width) position (Qwen3-VL: a run per frame).
        """
        offsets = _run_offsets(video_tokens)
        index = torch.arange(video_tokens.shape[1], device=video_tokens.device) - offsets
        corner = positions[1:].gather(-1, index.expand(2, *index.shape))
        starts = video_tokens & (positions[1:] == corner).all(0)
        return _number_frames(video_tokens, starts)


class Qwen3VLAdapter(MRopeAdapter):
    """Qwen3-VL: as Qwen2-VL, plus DeepStack visual features added to the visual tokens after the first layers."""

    def validate(self, model: nn.Module, config: PyramidDropConfig) -> None:
        super().validate(model, config)
        deepstack = len(getattr(model.config.vision_config, "deepstack_visual_indexes", ()) or ())
        if config.layer_list and config.layer_list[0] < deepstack:
            raise ValueError(
                f"layer_list starts at {config.layer_list[0]}, but {self.family} adds DeepStack visual features to "
                f"the visual tokens' hidden states after each of its first {deepstack} decoder layers, at the "
                "positions of the full sequence; a drop before they are all added would misplace them. "
                f"Use layer_list entries >= {deepstack}."
            )


def _run_offsets(mask: torch.Tensor) -> torch.Tensor:
    """Index of every token within its run of consecutive True entries of `mask` ([batch, seq])."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    previous = torch.nn.functional.pad(mask, (1, 0))[:, :-1]
    run_start = torch.where(mask & ~previous, positions, 0).cummax(dim=1).values
    return positions - run_start


def _number_frames(video_tokens: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """Frame ids unique in the batch: count frame starts in row-major order."""
    ids = starts.flatten().long().cumsum(0).view_as(starts) - 1
    return torch.where(video_tokens, ids, -1)


def _placeholder_mask(
    model: nn.Module, token_ids: list[int], input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None
) -> torch.Tensor | None:
    if input_ids is not None:
        return torch.isin(input_ids, torch.tensor(token_ids, device=input_ids.device))
    if inputs_embeds is None:
        return None
    placeholders = model.get_input_embeddings()(torch.tensor(token_ids, device=inputs_embeds.device))
    return (inputs_embeds[..., None, :] == placeholders).all(-1).any(-1)


ADAPTERS: dict[str, ModelAdapter] = {
    "llava": ModelAdapter(),
    "llava_next": LlavaNextAdapter(),
    "llava_onevision": LlavaOnevisionAdapter(),
    "qwen2_vl": MRopeAdapter("Qwen2-VL"),
    "qwen2_5_vl": MRopeAdapter("Qwen2.5-VL"),
    "qwen3_vl": Qwen3VLAdapter("Qwen3-VL"),
    "qwen3_vl_moe": Qwen3VLAdapter("Qwen3-VL-MoE"),
}


def get_adapter(model: nn.Module) -> ModelAdapter:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ADAPTERS:
        supported = ", ".join(f"{adapter.family} ({name})" for name, adapter in ADAPTERS.items())
        raise ValueError(
            f"PyramidDrop does not support model type {model_type!r} ({type(model).__name__}). "
            f"Supported families: {supported}. Load the model with its *ForConditionalGeneration class "
            "(e.g. AutoModelForImageTextToText)."
        )
    return ADAPTERS[model_type]
