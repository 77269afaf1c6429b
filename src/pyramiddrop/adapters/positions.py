"""Position ids as a family's rotary embedding takes them, and which `position_mode`s are sound for it."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PositionIds:
    """1-D positions `[batch, seq]` (Llama, Mistral, Qwen2 text models)."""

    modes: tuple[str, ...] = ("compact", "original")
    reason: str = ""  # why a position mode is missing from `modes`

    def normalize(
        self, position_ids: torch.Tensor | None, batch: int, past: int, length: int, device: torch.device
    ) -> torch.Tensor:
        if position_ids is None:
            position_ids = torch.arange(past, past + length, device=device)[None]
        return position_ids.expand(batch, -1)


@dataclass(frozen=True)
class MRopePositions(PositionIds):
    """Qwen-VL's multimodal RoPE: `[3, batch, seq]` (time, height, width); kept tokens keep their positions."""

    modes: tuple[str, ...] = ("original",)
    reason: str = (
        "positions are 3-D M-RoPE (time, height, width): a visual token's position is its place in the image "
        "grid and the text after an image continues from the grid's extent, so there is no sound renumbering "
        "of kept tokens; they keep their original positions"
    )
    axes: int = 3

    def normalize(
        self, position_ids: torch.Tensor | None, batch: int, past: int, length: int, device: torch.device
    ) -> torch.Tensor:
        """A leading text row (`[4, batch, seq]`, used by transformers for packing) is cut."""
        if position_ids is None:
            position_ids = torch.arange(past, past + length, device=device)
        if position_ids.dim() < 3:
            position_ids = position_ids.view(1, -1, position_ids.shape[-1])
        elif position_ids.shape[0] == self.axes + 1:
            position_ids = position_ids[1:]
        return position_ids.expand(self.axes, batch, -1)


SEQUENCE_POSITIONS = PositionIds()
