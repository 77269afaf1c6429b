"""Layout tokens: visual tokens that carry an image's 2-D layout rather than its content (row ends, image ends).

The engine never drops them and leaves them out of the ranked pool; the record counts them in
`num_layout_tokens`. A family finds them either by embedding (LLaVA-NeXT's `image_newline` shares the image
token id, so only the merged embeddings tell it apart) or by token (Pixtral's `[IMG_BREAK]` / `[IMG_END]`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class LayoutTokens:
    """No layout tokens (LLaVA-1.5, Qwen-VL, InternVL, Idefics3): every visual placeholder is droppable."""

    def from_placeholders(self, placeholders: torch.Tensor) -> torch.Tensor | None:
        """Layout tokens with ids of their own, found from the placeholder mask (`[batch, seq]`)."""
        return None

    def from_embeddings(self, model: nn.Module, token_mask: torch.Tensor, inputs_embeds: torch.Tensor):
        """Layout tokens among `token_mask` that only the language model's input embeddings reveal."""
        return None


@dataclass(frozen=True)
class NewlineEmbedding(LayoutTokens):
    """Visual tokens whose merged embedding equals the learned `model.model.<attribute>` vector (anyres rows)."""

    attribute: str = "image_newline"

    def from_embeddings(self, model: nn.Module, token_mask: torch.Tensor, inputs_embeds: torch.Tensor):
        newline = getattr(model.model, self.attribute).to(inputs_embeds.dtype)
        return token_mask & (inputs_embeds == newline).all(-1)


@dataclass(frozen=True)
class TokenAfterEachRow(LayoutTokens):
    """The token right after every run of placeholders: Pixtral ends each row of `[IMG]` tokens with
    `[IMG_BREAK]` and the last row with `[IMG_END]` (their ids are in the tokenizer, not the model config)."""

    def from_placeholders(self, placeholders: torch.Tensor) -> torch.Tensor:
        previous = torch.nn.functional.pad(placeholders, (1, 0))[:, :-1]
        return previous & ~placeholders
