"""Apply-time checks a family declares in `ModelAdapter.checks`: each raises a ValueError saying why the config
(or the model's own configuration) cannot run under PyramidDrop and what to change."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from pyramiddrop.config import PyramidDropConfig

if TYPE_CHECKING:
    from pyramiddrop.adapters.base import ModelAdapter


def rotary_language_model(adapter: ModelAdapter, model: nn.Module, config: PyramidDropConfig) -> None:
    """Later stages get rotary embeddings made from their kept tokens' positions and nothing else: the language
    model must make them with a `rotary_emb` module, and its attention must read positions only through them."""
    language_model = adapter.language_model(model)
    text_type = getattr(language_model.config, "model_type", type(language_model).__name__)
    if not callable(getattr(language_model, "rotary_emb", None)):
        raise ValueError(
            f"this {adapter.family} model's language model ({text_type}) has no `rotary_emb` module; PyramidDrop "
            "recomputes rotary embeddings for the kept tokens of every stage and supports RoPE language models only."
        )
    rope = getattr(language_model.config, "rope_parameters", None) or {}
    if isinstance(rope, dict) and rope.get("llama_4_scaling_beta") is not None:
        raise ValueError(
            f"this {adapter.family} model's language model ({text_type}) scales its queries by absolute position "
            "(rope_parameters['llama_4_scaling_beta']), which PyramidDrop's per-stage rotary embeddings do not carry; "
            "use a checkpoint whose text model is a plain RoPE model (e.g. model_type 'mistral')."
        )


def deepstack_before_first_drop(adapter: ModelAdapter, model: nn.Module, config: PyramidDropConfig) -> None:
    """Qwen3-VL adds DeepStack features to the visual tokens after its first decoder layers, by full-sequence index."""
    deepstack = len(getattr(model.config.vision_config, "deepstack_visual_indexes", ()) or ())
    if config.layer_list and config.layer_list[0] < deepstack:
        raise ValueError(
            f"layer_list starts at {config.layer_list[0]}, but {adapter.family} adds DeepStack visual features to "
            f"the visual tokens' hidden states after each of its first {deepstack} decoder layers, at the "
            "positions of the full sequence; a drop before they are all added would misplace them. "
            f"Use layer_list entries >= {deepstack}."
        )


def causal_attention_without_softcapping(adapter: ModelAdapter, model: nn.Module, config: PyramidDropConfig) -> None:
    """Gemma-style text models: ranking recomputes one attention row with plain softmax over causal keys."""
    text_config = adapter.language_model(model).config
    if getattr(text_config, "use_bidirectional_attention", False):
        raise ValueError(
            f"this {adapter.family} model's text model attends bidirectionally everywhere "
            "(use_bidirectional_attention=True, an embedding model): there is no last prompt token whose attention "
            "ranks the visual tokens; PyramidDrop needs a causal language model."
        )
    if getattr(text_config, "attn_logit_softcapping", None) is not None:
        raise ValueError(
            f"this {adapter.family} model caps its attention logits (attn_logit_softcapping="
            f"{text_config.attn_logit_softcapping}), which PyramidDrop's attention ranking does not reproduce; "
            "use a checkpoint with attn_logit_softcapping=None (all Gemma 3 checkpoints)."
        )
