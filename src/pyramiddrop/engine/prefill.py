"""A prefill's starting point: which tokens are droppable, their ranking groups and query rows, stage 0."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pyramiddrop.adapters import ModelAdapter
from pyramiddrop.config import PyramidDropConfig
from pyramiddrop.engine import ranking, stages
from pyramiddrop.engine.calls import CallInputs
from pyramiddrop.engine.rerank import BoundaryStore
from pyramiddrop.scoring import INPUT_PRIORS, PER_FRAME_SCORERS, STOCHASTIC_SCORERS


@dataclass
class PrefillState:
    """Everything one prefill decides, kept for the decode steps and turns that continue it."""

    stages: list[stages.Stage]
    # The stage whose drop made each stage's layout (0: the whole input, its layers need no help).
    layout_of: list[int]
    groups: stages.Groups
    token_mask: torch.Tensor
    num_layout_tokens: torch.Tensor
    frames: torch.Tensor | None = None
    vision_prior: torch.Tensor | None = None  # [batch, seq] the vision tower's scores, input coordinates
    input_prior: torch.Tensor | None = None  # [batch, seq] what the method read from the language model's input
    vision_features: torch.Tensor | None = None  # [batch, seq, width] the tower's features (vispruner)
    sample_seeds: torch.Tensor | None = None
    boundary: BoundaryStore | None = None  # conversation="rerank": what enters the first dropping layer

    @staticmethod
    def at_slots(prior: torch.Tensor | None, stage: stages.Stage) -> torch.Tensor | None:
        """A per-token prior in input coordinates (`vision_prior`, `input_prior`, `vision_features`) at a stage's
        slots, or None."""
        if prior is None:
            return None
        index = stage.source_index.clamp(min=0)
        if prior.dim() == 3:  # several values per token (tower layers, features)
            index = index[..., None].expand(-1, -1, prior.shape[-1])
        return prior.gather(1, index)

    def slot_fields(self, stage: stages.Stage) -> dict[str, torch.Tensor | None]:
        """The `RankInputs` fields held per input token (priors, tower features, video frames), at a stage's slots."""
        return {
            "vision_scores": self.at_slots(self.vision_prior, stage),
            "vision_features": self.at_slots(self.vision_features, stage),
            "input_prior": self.at_slots(self.input_prior, stage),
            "frame_index": self.frames_at(stage),
        }

    def frames_at(self, stage: stages.Stage) -> torch.Tensor | None:
        """The video frame of a stage's droppable slots (-1 for the others), or None without video."""
        if self.frames is None:
            return None
        return self.frames.gather(1, stage.source_index.clamp(min=0)).masked_fill(~stage.pool, -1)


def start_prefill(
    model: nn.Module,
    adapter: ModelAdapter,
    config: PyramidDropConfig,
    pending: CallInputs,
    embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    prompt_length: int | None = None,
    vision: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None),
) -> PrefillState:
    """Stage 0 of every stage (nothing dropped yet), from what the outer model's hook captured; `vision`: the
    tower's scores and features of the call's images (methods that rank by them)."""
    token_mask = pending.token_mask if pending.token_mask is not None else torch.zeros_like(attention_mask)
    if token_mask.shape != attention_mask.shape:
        raise ValueError(
            f"PyramidDrop found visual tokens for a {tuple(token_mask.shape)} input but the language model got "
            f"{tuple(attention_mask.shape)}; this model rewrites its input ids, which this adapter does not support."
        )
    pool = adapter.droppable_mask(model, token_mask, embeds) & attention_mask
    if pending.layout_mask is not None:
        pool &= ~pending.layout_mask
    frames = None
    if pending.video_mask is not None and bool((pending.video_mask & pool).any()):
        frames = adapter.frame_index(model, pending.video_mask & pool, position_ids)
        if config.method in PER_FRAME_SCORERS and config.video_pool != "frame":
            raise ValueError(
                f"method {config.method!r} pools each video frame's grid: use video_pool='frame' for videos (one "
                "ranking group per frame)."
            )
    groups = stages.ranking_groups(pool, frames, per_frame=config.video_pool == "frame")
    features = vision[1]
    if features is not None and bool(pool.any()):
        _check_one_image_per_sample(pool, features.shape[1], config.method)
        features = features.flatten(0, 1)
    training = pending.labels is not None and model.training
    query = stages.query_rows(
        attention_mask,
        token_mask,
        answer_mask=pending.labels != stages.IGNORE_INDEX if training else None,
        prompt_length=prompt_length,
        instruction_mean=config.query == "instruction_mean",
    )
    stage0 = stages.first_stage(attention_mask, position_ids, pool, groups, query, pending.blocks)
    seeds = None
    if config.method in STOCHASTIC_SCORERS:
        seeds = ranking.sample_seeds(config.seed, pending.input_ids, attention_mask, prompt_length)
    return PrefillState(
        stages=[stage0] * config.num_stages,
        layout_of=[0] * config.num_stages,
        groups=groups,
        token_mask=token_mask,
        num_layout_tokens=(token_mask & attention_mask & ~pool).sum(1),
        frames=frames,
        vision_prior=ranking.place_vision_scores(vision[0], token_mask, config.method),
        vision_features=ranking.place_vision_scores(features, token_mask, config.method),
        input_prior=INPUT_PRIORS[config.method](embeds.detach(), attention_mask, pool, query)
        if config.method in INPUT_PRIORS
        else None,
        sample_seeds=seeds,
    )


def _check_one_image_per_sample(pool: torch.Tensor, patches: int, method: str) -> None:
    """Methods that select within each image as their release does, for one image per sample (the engine's
    keep count is per sample)."""
    counts = pool.sum(1)
    if bool((counts > patches).any()):
        raise ValueError(
            f"method {method!r} selects within one image as its release does; a sample has {int(counts.max())} "
            f"image tokens, more than one image's {patches}: pass one image per prompt, or choose a method that ranks "
            "a sample's images together (e.g. 'visionzip' or 'divprune')."
        )
