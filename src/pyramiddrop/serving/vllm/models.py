"""vLLM's LLaVA-1.5, LLaVA-NeXT, Qwen2-VL and Qwen2.5-VL with PyramidDrop: the same classes, whose language model
drops visual tokens at the stage boundaries of the `pyramid_drop` schedule in their config
(pyramiddrop.serving.vllm.layers). Without a schedule every method is vLLM's own.

The LLaVA classes also load checkpoints saved by transformers 5.x, whose CLIP keys are flattened
(`vision_tower.embeddings...` instead of the hub layout `vision_tower.vision_model.embeddings...` that vLLM expects),
with or without a schedule.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from vllm.model_executor.models.llava import LlavaForConditionalGeneration
from vllm.model_executor.models.llava_next import LlavaNextForConditionalGeneration
from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration
from vllm.model_executor.models.qwen2_vl import Qwen2VLForConditionalGeneration

from pyramiddrop.serving.vllm.checks import pyramid_drop_config
from pyramiddrop.serving.vllm.layers import DropRuntime


class _PyramidDrop:
    """What the families share; a family says which visual embeddings are layout (never dropped)."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        config = pyramid_drop_config(vllm_config.model_config.hf_config)
        self.pyramid_drop_runtime = None if config is None else DropRuntime(config, vllm_config)

    def embed_input_ids(self, input_ids: torch.Tensor, *args, is_multimodal: torch.Tensor | None = None, **kwargs):
        embeds = super().embed_input_ids(input_ids, *args, is_multimodal=is_multimodal, **kwargs)
        runtime = self.pyramid_drop_runtime
        if runtime is not None:  # which of this step's tokens are visual, and which of those are layout
            runtime.visual_mask = None if is_multimodal is None else is_multimodal.clone()
            runtime.layout_mask = None if is_multimodal is None else self.layout_mask(embeds, is_multimodal)
        return embeds

    def layout_mask(self, embeds: torch.Tensor, visual: torch.Tensor) -> torch.Tensor | None:
        return None

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        runtime = self.pyramid_drop_runtime
        if runtime is None or inputs_embeds is None:
            return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)
        return runtime.run(self.language_model.model, positions, inputs_embeds)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return super().load_weights((hub_clip_key(name), tensor) for name, tensor in weights)


class PyramidDropLlava(_PyramidDrop, LlavaForConditionalGeneration):
    pass


class PyramidDropLlavaNext(_PyramidDrop, LlavaNextForConditionalGeneration):
    def layout_mask(self, embeds: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        """The row-end tokens (`image_newline`, as the transformers adapter's layout): embeddings equal to it."""
        return visual & (embeds == self.image_newline.to(embeds.dtype)).all(dim=-1)


class PyramidDropQwen2VL(_PyramidDrop, Qwen2VLForConditionalGeneration):
    """Qwen2-VL: M-RoPE positions `[3, tokens]`, kept tokens keep theirs (position_mode='original', checked at
    start); vLLM's decode positions (its M-RoPE deltas) are then unchanged."""


class PyramidDropQwen2_5VL(_PyramidDrop, Qwen2_5_VLForConditionalGeneration):
    """Qwen2.5-VL: as Qwen2-VL."""


def hub_clip_key(name: str) -> str:
    """`[model.]vision_tower.embeddings...` (transformers 5.x) -> `[model.]vision_tower.vision_model.embeddings...`."""
    head, found, tail = name.partition("vision_tower.")
    if found and head in ("", "model.") and not tail.startswith("vision_model."):
        return f"{head}vision_tower.vision_model.{tail}"
    return name
