"""Per-family adapters: what differs between vision-language models (where the visual tokens are, which
module is the language model, how positions turn into rotary embeddings). The engine knows nothing else.
"""

from __future__ import annotations

import torch
from torch import nn

from pyramiddrop.scoring import rotate_half_rope


class ModelAdapter:
    """LLaVA-1.5 layout: the processor expands `<image>` into `image_token_id` placeholders."""

    family = "LLaVA-1.5"
    position_modes = ("compact", "original")

    def language_model(self, model: nn.Module) -> nn.Module:
        return model.get_decoder()

    def token_mask(self, model: nn.Module, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None):
        """Placeholder positions of visual tokens, from the ids or (embeds only) from the placeholder embedding."""
        token_id = model.config.image_token_id
        if input_ids is not None:
            return input_ids == token_id
        if inputs_embeds is None:
            return None
        placeholder = model.get_input_embeddings()(torch.tensor(token_id, device=inputs_embeds.device))
        return (inputs_embeds == placeholder).all(-1)

    def droppable_mask(self, model: nn.Module, token_mask: torch.Tensor, inputs_embeds: torch.Tensor):
        """The visual tokens that may be dropped (all of them for LLaVA-1.5)."""
        return token_mask

    def rotary(self, language_model: nn.Module, hidden_states: torch.Tensor, position_ids: torch.Tensor):
        return language_model.rotary_emb(hidden_states, position_ids=position_ids)

    apply_rope = staticmethod(rotate_half_rope)


class LlavaNextAdapter(ModelAdapter):
    """LLaVA-NeXT anyres: the `image_newline` tokens that end each row of the crop grid share the image token id.

    They carry the 2-D layout, not content, so they are never dropped and are left out of the ranked pool;
    the pool of a sample is its base image and crop tokens (all images of the sample together).
    """

    family = "LLaVA-NeXT"

    def droppable_mask(self, model: nn.Module, token_mask: torch.Tensor, inputs_embeds: torch.Tensor):
        newline = model.model.image_newline.to(inputs_embeds.dtype)
        is_newline = (inputs_embeds == newline).all(-1)
        return token_mask & ~is_newline


ADAPTERS: dict[str, ModelAdapter] = {
    "llava": ModelAdapter(),
    "llava_next": LlavaNextAdapter(),
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
