"""What `conversation="rerank"` keeps between turns: the input of the first dropping layer, for every token.

The layers before the first drop see every token in every turn, so their cache stays valid; a new turn only
needs the hidden states entering the first dropping layer (and their positions) to rank all visual tokens
again with the new question and recompute the later stages. Those hidden states are stored here, in input
coordinates, and grow by every token the model processes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from pyramiddrop.engine.ranking import sample_seeds
from pyramiddrop.engine.stages import Stage, query_rows

if TYPE_CHECKING:
    from pyramiddrop.engine.prefill import PrefillState


@dataclass
class BoundaryStore:
    hidden: torch.Tensor  # [batch, length, width], entering the first dropping layer
    positions: torch.Tensor  # [..., batch, length] position ids (M-RoPE: a leading axis)
    token_mask: torch.Tensor  # [batch, length] visual tokens (for the "instruction_mean" query)

    def append(self, hidden: torch.Tensor, positions: torch.Tensor) -> None:
        self.hidden = torch.cat([self.hidden, hidden.detach()], dim=1)
        self.positions = torch.cat([self.positions, positions], dim=-1)
        new = torch.zeros(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        self.token_mask = torch.cat([self.token_mask, new], dim=1)

    def crop(self, length: int) -> None:
        """Forget tokens past `length` (rejected candidates of assisted decoding)."""
        self.hidden, self.token_mask = self.hidden[:, :length], self.token_mask[:, :length]
        self.positions = self.positions[..., :length]

    def nbytes(self) -> int:
        return self.hidden.numel() * self.hidden.element_size()


def extend_with(values: torch.Tensor, length: int, fill: int | bool) -> torch.Tensor:
    """`values` [batch, n] padded on the right with `fill` up to `length` columns."""
    extra = values.new_full((values.shape[0], length - values.shape[1]), fill)
    return torch.cat([values, extra], dim=1)


def restart_for_new_turn(
    prefill: PrefillState,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    new_input_ids: torch.Tensor | None,
    prompt_length: int | None,
    instruction_mean: bool,
) -> Stage:
    """Turn `prefill` into a fresh prefill of the whole conversation (the stored turns plus the new one) from the
    first dropping layer on, with every visual token back in the pool; returns its stage 0."""
    stored, previous, length = prefill.boundary, prefill.stages[0], attention_mask.shape[1]
    token_mask = extend_with(stored.token_mask, length, False)
    stage0 = Stage(
        attention_mask=attention_mask,
        positions=torch.cat([stored.positions, position_ids], dim=-1),
        source_index=torch.arange(length, device=attention_mask.device).expand_as(attention_mask),
        pool_index=extend_with(previous.pool_index, length, -1),
        group_index=extend_with(previous.group_index, length, -1),
        query_mask=query_rows(attention_mask, token_mask, None, prompt_length, instruction_mean),
        dropped=torch.zeros_like(previous.dropped),
        block_index=None if previous.block_index is None else extend_with(previous.block_index, length, -1),
    )
    prefill.stages = [stage0] * len(prefill.stages)
    prefill.layout_of = [0] * len(prefill.stages)
    if prefill.vision_prior is not None:
        prefill.vision_prior = extend_with(prefill.vision_prior, length, 0.0)
    if prefill.frames is not None:  # the video frames, for ranking groups' counts and the record
        prefill.frames = extend_with(prefill.frames, length, -1)
    if prefill.sample_seeds is not None:  # the new turn's tokens mixed into each sample's seed
        new_mask = attention_mask[:, -position_ids.shape[-1] :]
        prefill.sample_seeds = sample_seeds(prefill.sample_seeds, new_input_ids, new_mask)
    return stage0
