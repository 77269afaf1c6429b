"""What `conversation="rerank"` keeps between turns: the input of the first dropping layer, for every token.

The layers before the first drop see every token in every turn, so their cache stays valid; a new turn only
needs the hidden states entering the first dropping layer (and their positions) to rank all visual tokens
again with the new question and recompute the later stages. Those hidden states are stored here, in input
coordinates, and grow by every token the model processes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
