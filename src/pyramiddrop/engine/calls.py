"""What one forward call hands the engine: captured by the outer model's hook, built per stage for the layers."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pyramiddrop.engine.stages import IGNORE_INDEX


@dataclass
class CallInputs:
    """Captured by the outer model's pre-hook for the language model's call that follows."""

    input_ids: torch.Tensor | None = None
    token_mask: torch.Tensor | None = None
    layout_mask: torch.Tensor | None = None  # layout tokens with their own ids (Pixtral's row breaks)
    video_mask: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    loss_kwargs: dict = field(default_factory=dict)
    visual_inputs: bool = False  # pixels or pre-encoded features came with the call
    padding_mask: torch.Tensor | None = None  # the call's 2-D mask (for language models given prepared masks)
    blocks: torch.Tensor | None = None  # bidirectional image blocks, from the adapter


@dataclass
class StageInputs:
    """What the layers of one stage receive in the current call (layers sharing a layout share one)."""

    attention_mask: torch.Tensor  # 2-D, over this stage's cache plus the new tokens
    position_ids: torch.Tensor
    blocks: torch.Tensor | None = None  # bidirectional image blocks (prefill of a family that has them)
    # Per layer type, built once per call: the backend's mask, the rotary (cos, sin) at `position_ids`.
    causal_masks: dict = field(default_factory=dict)
    position_embeddings: dict = field(default_factory=dict)


@dataclass
class CallState:
    """Per forward call: prefill, re-rank or decode, and the inputs each stage layout hands its layers."""

    is_prefill: bool = False
    rerank: bool = False
    positions: torch.Tensor | None = None
    stage_inputs: dict[int, StageInputs] = field(default_factory=dict)  # by `layout_of`
    # Layer index -> (layer, input hidden states, rotary) of the layer before a drop (FastV, DART, SparseVLM).
    layer_before: dict[int, tuple] = field(default_factory=dict)


def capture_call(adapter, module, args: tuple, kwargs: dict, drops: bool) -> CallInputs:
    """Where the visual tokens are, and the labels (taken out of `kwargs`: the logits come out shorter than them,
    so the outer post-hook computes the loss on gathered labels)."""
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    embeds = kwargs.get("inputs_embeds")
    pending = CallInputs(
        input_ids=input_ids,
        token_mask=adapter.token_mask(module, input_ids, embeds),
        layout_mask=adapter.layout_mask(module, input_ids, embeds),
        video_mask=adapter.video_mask(module, input_ids, embeds),
        visual_inputs=has_visual_inputs(kwargs),
        blocks=adapter.attention_blocks(module, kwargs),
    )
    if isinstance(kwargs.get("attention_mask"), torch.Tensor) and kwargs["attention_mask"].dim() == 2:
        pending.padding_mask = kwargs["attention_mask"]
    if kwargs.get("fused_lm_head") and drops:
        raise ValueError(
            "PyramidDrop shortens the sequence inside the language model, so TRL's SFTTrainer loss, computed from "
            "the backbone's hidden states against the full-length labels (fused_lm_head=True), cannot line up; "
            "train with pyramiddrop.integrations.trl.PyramidDropSFTTrainer, which takes the model's own loss."
        )
    if kwargs.get("labels") is not None and drops:
        if module.training:
            check_visual_labels(kwargs["labels"], pending.token_mask)
        pending.labels = kwargs.pop("labels")
        if "num_items_in_batch" in kwargs:
            pending.loss_kwargs["num_items_in_batch"] = kwargs["num_items_in_batch"]
    return pending


def has_visual_inputs(kwargs: dict) -> bool:
    return any(
        value is not None and (key.startswith("pixel_values") or key == "mm_encoder_outputs")
        for key, value in kwargs.items()
    )


def check_visual_labels(labels: torch.Tensor, token_mask: torch.Tensor | None) -> None:
    """Training drops visual tokens with their labels, and ranks with the token before each answer span: a loss on
    the visual placeholders (a loss on the whole sequence) would lose terms and leave no answer span to rank with."""
    if token_mask is None or token_mask.shape != labels.shape:
        return
    supervised = int((token_mask & (labels != IGNORE_INDEX)).sum())
    if supervised:
        raise ValueError(
            f"PyramidDrop training got labels on {supervised} visual-token positions (a loss on the whole sequence, "
            "e.g. TRL's SFTTrainer with neither assistant_only_loss=True nor a prompt-completion dataset); it drops "
            "visual tokens and ranks them with the token before each answer span, so set the labels of everything "
            "but the answers to -100."
        )


def layer_types(config, num_layers: int, supported: list[str]) -> list[str]:
    """Attention type of every decoder layer (`config.layer_types`, else sliding for all if a window is set)."""
    types = list(getattr(config, "layer_types", None) or [])
    if not types:
        types = ["sliding_attention" if getattr(config, "sliding_window", None) else "full_attention"] * num_layers
    unknown = sorted(set(types) - set(supported))
    if unknown:
        raise ValueError(
            f"PyramidDrop builds per-stage masks for {sorted(supported)} layers; this language model has "
            f"layers of type {unknown}, which it does not support."
        )
    return types
