"""`DropRecord`: what the last prefill kept, per sample and stage, built from the stage layouts on first read."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pyramiddrop.engine.stages import Stage


@dataclass
class DropRecord:
    """What the last prefill did, per sample. Read it with `pyramiddrop.get_drop_record(model)`.

    - `num_visual_tokens[b]`: the sample's droppable visual tokens N_b (all images of the sample together;
      layout tokens, LLaVA-NeXT's row newlines or Pixtral's row breaks, are visual but never dropped and
      counted in `num_layout_tokens`).
    - `kept_visual_indices[b][s]`: sorted indices in `0..N_b-1` of the visual tokens alive in stage `s`
      (stage 0 holds all of them).
    - `tokens_per_layer[b, l]` / `visual_tokens_per_layer[b, l]`: real tokens (visual tokens) that decoder
      layer `l` processed for sample `b`.
    - `kept_positions[b, j]`: which input position the j-th output position comes from (-1 for filler);
      use it to align logits with full-length inputs or labels.
    - `visual_frame_index[b]`: for each of the sample's `N_b` visual tokens, the video frame it belongs to
      (0-based within the sample, over all its videos), -1 for image tokens.
    """

    layer_list: list[int]
    position_mode: str
    num_visual_tokens: list[int]
    num_layout_tokens: list[int]
    kept_visual_indices: list[list[torch.Tensor]]
    tokens_per_layer: torch.Tensor
    visual_tokens_per_layer: torch.Tensor
    kept_positions: torch.Tensor
    visual_frame_index: list[torch.Tensor] = field(default_factory=list)


def _frames_per_sample(stage0: Stage, frames: torch.Tensor | None) -> list[torch.Tensor]:
    """Each sample's frame ids over its visual tokens, renumbered 0.. within the sample (-1 for images)."""
    visual_frames = []
    for row in range(stage0.pool_index.shape[0]):
        pool = stage0.pool_index[row] >= 0
        if frames is None:
            visual_frames.append(torch.full((int(pool.sum()),), -1, dtype=torch.long))
            continue
        row_frames = frames[row][pool].cpu()
        video = row_frames >= 0
        renumbered = torch.full_like(row_frames, -1)
        renumbered[video] = torch.unique(row_frames[video], return_inverse=True)[1]
        visual_frames.append(renumbered)
    return visual_frames


def make_record(
    stages: list[Stage],
    stage_of_layer: list[int],
    config,
    num_layout_tokens: torch.Tensor,
    frames: torch.Tensor | None,
) -> DropRecord:
    stage0 = stages[0]
    num_visual = stage0.pool_index.max(dim=1).values + 1
    kept = [
        [stage.pool_index[row][stage.pool[row]].sort().values.cpu() for stage in stages]
        for row in range(stage0.pool_index.shape[0])
    ]
    per_stage_tokens = torch.stack([stage.attention_mask.sum(1) for stage in stages], dim=1)
    per_stage_visual = torch.stack([stage.pool.sum(1) for stage in stages], dim=1)
    layer_stage = torch.tensor(stage_of_layer, device=per_stage_tokens.device)
    return DropRecord(
        layer_list=list(config.layer_list),
        position_mode=config.position_mode,
        num_visual_tokens=num_visual.tolist(),
        num_layout_tokens=num_layout_tokens.tolist(),
        kept_visual_indices=kept,
        tokens_per_layer=per_stage_tokens[:, layer_stage].cpu(),
        visual_tokens_per_layer=(per_stage_visual[:, layer_stage] + num_layout_tokens[:, None]).cpu(),
        kept_positions=stages[-1].source_index.cpu(),
        visual_frame_index=_frames_per_sample(stage0, frames),
    )
