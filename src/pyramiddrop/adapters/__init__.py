"""Per-family adapters: what differs between vision-language models (where the visual tokens are, which of them
carry layout, which module is the language model, how position ids look and turn into rotary embeddings, how
video tokens split into frames, which settings a family cannot take). The engine knows nothing else.

Add a family with `register_adapter(model_type, ModelAdapter(...))`; docs/adapters.md walks through one.
"""

from __future__ import annotations

from torch import nn

from pyramiddrop.adapters.base import Check, ModelAdapter, placeholder_mask
from pyramiddrop.adapters.families import ADAPTERS
from pyramiddrop.adapters.layout import LayoutTokens, NewlineEmbedding, TokenAfterEachRow
from pyramiddrop.adapters.positions import MRopePositions, PositionIds
from pyramiddrop.adapters.video import FixedSizeFrames, FrameSplit, GridCornerFrames

__all__ = [
    "ADAPTERS",
    "Check",
    "FixedSizeFrames",
    "FrameSplit",
    "GridCornerFrames",
    "LayoutTokens",
    "MRopePositions",
    "ModelAdapter",
    "NewlineEmbedding",
    "PositionIds",
    "TokenAfterEachRow",
    "get_adapter",
    "placeholder_mask",
    "register_adapter",
]


def register_adapter(model_type: str, adapter: ModelAdapter) -> ModelAdapter:
    """Support models whose `config.model_type` is `model_type` (replaces an earlier registration)."""
    ADAPTERS[model_type] = adapter
    return adapter


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
