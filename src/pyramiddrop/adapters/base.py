"""`ModelAdapter`: what the engine asks a model family, built from small declarations.

A family is a `ModelAdapter(...)` naming the config fields that hold its placeholder ids, its layout tokens, how
its video tokens split into frames, its position ids, and the settings it cannot take (`checks`). The engine only
calls the methods below; new families should need no new methods (docs/adapters.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from pyramiddrop.adapters.layout import LayoutTokens
from pyramiddrop.adapters.masks import ImageBlocks, stage_mask
from pyramiddrop.adapters.positions import SEQUENCE_POSITIONS, PositionIds
from pyramiddrop.adapters.video import FrameSplit
from pyramiddrop.config import PyramidDropConfig
from pyramiddrop.scoring import rotate_half_rope
from pyramiddrop.vision_attention import VisionAttentionSpec

# An apply-time check: raises ValueError (saying why and what to set instead) when `config` cannot run on `model`.
Check = Callable[["ModelAdapter", nn.Module, PyramidDropConfig], None]


@dataclass(frozen=True)
class ModelAdapter:
    """One family's declarations. Defaults are LLaVA-1.5: `<image>` expands into `image_token_id` placeholders,
    1-D positions, no layout tokens, no video."""

    family: str = "LLaVA-1.5"
    visual_token_keys: tuple[str, ...] = ("image_token_id",)  # config attributes holding visual placeholder ids
    video_token_key: str | None = None  # the config attribute of the video placeholder id
    layout: LayoutTokens = LayoutTokens()  # visual tokens that carry the layout: kept, outside the ranked pool
    frames: FrameSplit | None = None  # how a video's droppable tokens split into frames
    position_ids: PositionIds = SEQUENCE_POSITIONS
    rotary_by_layer_type: bool = False  # `rotary_emb(x, positions, layer_type)`: local and global layers differ
    blocks: ImageBlocks | None = None  # image tokens that attend to their whole image (Gemma 3)
    checks: tuple[Check, ...] = ()
    vision_tower_name: str = "vision_tower"  # the vision encoder's attribute on `model.model`
    # How to read the vision tower's attention per image token (`visionzip`); None where patches do not map one
    # to one onto image tokens (anyres crops, pixel shuffle, merged or pooled patches).
    vision_attention: Callable[[nn.Module], VisionAttentionSpec] | None = None

    @property
    def position_modes(self) -> tuple[str, ...]:
        return self.position_ids.modes

    def language_model(self, model: nn.Module) -> nn.Module:
        return model.get_decoder()

    def vision_tower(self, model: nn.Module) -> nn.Module:
        """The vision encoder (for selection methods that read its attention or outputs)."""
        return getattr(model.model, self.vision_tower_name)

    def validate(self, model: nn.Module, config: PyramidDropConfig) -> None:
        """Apply-time checks of a config against this family; errors say why and what to set instead."""
        modes = self.position_ids.modes
        if config.position_mode not in modes:
            reason = f" ({self.position_ids.reason})" if self.position_ids.reason else ""
            raise ValueError(
                f"position_mode={config.position_mode!r} is not valid for {self.family} models{reason}; "
                f"use one of {modes}, e.g. PyramidDropConfig(..., position_mode={modes[0]!r})."
            )
        for check in self.checks:
            check(self, model, config)

    def placeholder_ids(self, model: nn.Module) -> list[int]:
        ids = [getattr(model.config, key, None) for key in self.visual_token_keys]
        return [i for i in ids if i is not None]

    def token_mask(
        self, model: nn.Module, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None
    ) -> torch.Tensor | None:
        """Visual tokens: the placeholders (from the ids, or from the placeholder embeddings) and layout tokens."""
        placeholders = placeholder_mask(model, self.placeholder_ids(model), input_ids, inputs_embeds)
        layout = self.layout_mask(model, input_ids, inputs_embeds, placeholders)
        return placeholders if layout is None else placeholders | layout

    def layout_mask(
        self,
        model: nn.Module,
        input_ids: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None,
        placeholders: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """Layout tokens that are their own token ids (Pixtral's row breaks), None if the family has none."""
        if placeholders is None:
            placeholders = placeholder_mask(model, self.placeholder_ids(model), input_ids, inputs_embeds)
        return None if placeholders is None else self.layout.from_placeholders(placeholders)

    def droppable_mask(self, model: nn.Module, token_mask: torch.Tensor, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """The visual tokens that may be dropped, given the language model's input embeddings."""
        layout = self.layout.from_embeddings(model, token_mask, inputs_embeds)
        return token_mask if layout is None else token_mask & ~layout

    def video_mask(
        self, model: nn.Module, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None
    ) -> torch.Tensor | None:
        """Placeholder positions of video tokens (None for families without video)."""
        if self.video_token_key is None:
            return None
        return placeholder_mask(model, [getattr(model.config, self.video_token_key)], input_ids, inputs_embeds)

    def frame_index(self, model: nn.Module, video_tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Video frame of every droppable video token (`video_tokens`, [batch, seq]); ids unique in the batch, -1
        elsewhere. Read from the sequence itself: `generate()` passes encoder outputs, not the videos' shapes.
        """
        if self.frames is None:
            raise NotImplementedError(f"{self.family} has no video input.")
        return self.frames.frame_index(model, video_tokens, positions)

    def positions(
        self, position_ids: torch.Tensor | None, batch: int, past: int, length: int, device: torch.device
    ) -> torch.Tensor:
        """Position ids in the shape the rotary embedding takes (`[batch, seq]`, M-RoPE `[3, batch, seq]`)."""
        return self.position_ids.normalize(position_ids, batch, past, length, device)

    def rotary(
        self,
        language_model: nn.Module,
        hidden_states: torch.Tensor,
        position_ids: torch.Tensor,
        layer_type: str = "full_attention",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) for `position_ids`, for layers of `layer_type`."""
        if self.rotary_by_layer_type:
            return language_model.rotary_emb(hidden_states, position_ids, layer_type)
        return language_model.rotary_emb(hidden_states, position_ids=position_ids)

    def attention_blocks(self, model: nn.Module, kwargs: dict) -> torch.Tensor | None:
        """Bidirectional image block of every token of the outer call (`[batch, seq]`, -1 for text), if any."""
        return None if self.blocks is None else self.blocks.from_call(model, kwargs)

    # A later stage's attention mask for one layer type, over its kept tokens (and their image blocks).
    stage_mask = staticmethod(stage_mask)

    apply_rope = staticmethod(rotate_half_rope)


def placeholder_mask(
    model: nn.Module, token_ids: list[int], input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None
) -> torch.Tensor | None:
    """Where the placeholders are: from the ids, or (embeds only) where the embeddings equal the placeholders'."""
    if input_ids is not None:
        return torch.isin(input_ids, torch.tensor(token_ids, device=input_ids.device))
    if inputs_embeds is None:
        return None
    placeholders = model.get_input_embeddings()(torch.tensor(token_ids, device=inputs_embeds.device))
    return (inputs_embeds[..., None, :] == placeholders).all(-1).any(-1)
