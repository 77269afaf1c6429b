"""Each later stage's attention mask per layer type, from transformers' own mask builders.

Most families: a causal mask (`full_attention`) or a sliding-window one (`sliding_attention`) over the stage's
kept tokens. Families whose image tokens attend to each other bidirectionally (Gemma 3) pass the stage's image
blocks, and the masks are built as the model builds them: full layers OR(causal, block), sliding layers
AND(window, OR(causal, block)).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.masking_utils import (
    blockwise_overlay,
    create_causal_mask,
    create_sliding_window_causal_mask,
    sliding_window_overlay,
)

MASK_FUNCTIONS = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}


def stage_mask(
    layer_type: str,
    config,
    hidden: torch.Tensor,
    padding_mask: torch.Tensor,
    cache,
    layer_index: int,
    blocks: torch.Tensor | None = None,
):
    """The backend's mask for one layer type. The 2-D mask is always given, so position ids (only read for packed
    sequences without one) are not; a sliding window counts cache slots, i.e. kept tokens of the stage."""
    # config, embeds, mask, cache (`past_key_values` before transformers 5.24, `cache` since): by position
    arguments = (config, hidden, padding_mask, cache)
    if blocks is None:
        return MASK_FUNCTIONS[layer_type](*arguments, position_ids=None, layer_idx=layer_index)
    if layer_type == "full_attention":
        return create_causal_mask(*arguments, position_ids=None, block_sequence_ids=blocks, layer_idx=layer_index)
    return create_causal_mask(
        *arguments,
        position_ids=None,
        or_mask_function=blockwise_overlay(blocks),
        and_mask_function=sliding_window_overlay(config.sliding_window),
        layer_idx=layer_index,
    )


@dataclass(frozen=True)
class ImageBlocks:
    """Image tokens attend to all tokens of their own image (one run of `token_type_ids == 1`), in prefill only:
    the model makes the block mask when the call carries `token_type_ids` (generate passes them to the prefill)."""

    key: str = "token_type_ids"

    def from_call(self, model: nn.Module, kwargs: dict) -> torch.Tensor | None:
        """Block id of every token (`[batch, seq]`, -1 for text), as transformers' block masks take them."""
        types = kwargs.get(self.key)
        if types is None:
            return None
        is_image = types == 1
        starts = is_image & ~torch.nn.functional.pad(is_image, (1, 0))[:, :-1]
        return torch.where(is_image, starts.long().cumsum(1) - 1, -1)
