"""How a video's droppable tokens split into frames (for `video_pool="frame"` and the record's frame index)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


class FrameSplit:
    def frame_index(self, model: nn.Module, video_tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Frame id of every droppable video token (`video_tokens`, [batch, seq]), unique in the batch, -1 elsewhere."""
        raise NotImplementedError


@dataclass(frozen=True)
class FixedSizeFrames(FrameSplit):
    """Frames of `tokens_per_frame(model.config)` tokens each, back to back (a trailing newline is not droppable)."""

    tokens_per_frame: Callable[[object], int]

    def frame_index(self, model: nn.Module, video_tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        per_frame = self.tokens_per_frame(model.config)
        starts = video_tokens & (run_offsets(video_tokens) % per_frame == 0)
        return number_frames(video_tokens, starts)


@dataclass(frozen=True)
class GridCornerFrames(FrameSplit):
    """M-RoPE: every frame of a video covers the same (height, width) grid of positions, so a frame starts wherever
    a run of video tokens returns to the run's top-left (height, width) position (Qwen3-VL: a run per frame)."""

    def frame_index(self, model: nn.Module, video_tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        offsets = run_offsets(video_tokens)
        index = torch.arange(video_tokens.shape[1], device=video_tokens.device) - offsets
        corner = positions[1:].gather(-1, index.expand(2, *index.shape))
        starts = video_tokens & (positions[1:] == corner).all(0)
        return number_frames(video_tokens, starts)


def run_offsets(mask: torch.Tensor) -> torch.Tensor:
    """Index of every token within its run of consecutive True entries of `mask` ([batch, seq])."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    previous = torch.nn.functional.pad(mask, (1, 0))[:, :-1]
    run_start = torch.where(mask & ~previous, positions, 0).cummax(dim=1).values
    return positions - run_start


def number_frames(video_tokens: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """Frame ids unique in the batch: count frame starts in row-major order."""
    ids = starts.flatten().long().cumsum(0).view_as(starts) - 1
    return torch.where(video_tokens, ids, -1)
