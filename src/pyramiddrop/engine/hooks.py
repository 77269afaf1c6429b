"""The transformers front end: forward hooks that run the stage functions (`stages.py`) inside a model.

Three hooks, no copied modeling code: on the vision-language model (where the visual tokens are, the labels);
on the language model (a prefill when the cache is empty, else extend every stage by the call's new tokens after
matching each stage's slots to its cache, `cache.py`); on each decoder layer of a later stage (at the stage's
first layer in prefill, rank and gather; then give every layer of the stage its own mask and rotary embeddings).
What differs per model family (visual and layout tokens, positions, rotary, masks, frames) comes from the adapter.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from transformers.cache_utils import DynamicCache

from pyramiddrop.adapters import ModelAdapter
from pyramiddrop.adapters.masks import MASK_FUNCTIONS
from pyramiddrop.config import PyramidDropConfig
from pyramiddrop.engine import ranking, stages
from pyramiddrop.engine.cache import StageSlots, cache_argument
from pyramiddrop.engine.calls import CallInputs, CallState, StageInputs, capture_call, layer_types
from pyramiddrop.engine.prefill import PrefillState, start_prefill
from pyramiddrop.engine.record import DropRecord, make_record
from pyramiddrop.engine.rerank import BoundaryStore, restart_for_new_turn
from pyramiddrop.scoring import LAYER_BEFORE_SCORERS
from pyramiddrop.vision_attention import VisionAttentionCapture


class PyramidDropEngine:
    def __init__(self, model: nn.Module, config: PyramidDropConfig, adapter: ModelAdapter) -> None:
        self.model, self.config, self.adapter = model, config, adapter
        self.language_model = adapter.language_model(model)
        self.layers = self.language_model.layers
        self.layer_types = layer_types(self.language_model.config, len(self.layers), list(MASK_FUNCTIONS))
        self.stage_of_layer = [sum(layer >= b for b in config.layer_list) for layer in range(len(self.layers))]
        self.first_layer_of_stage = [0, *config.layer_list]
        # Set by `generate` (generation.py): tokens past it (assisted decoding's candidates) never rank.
        self.prompt_length: int | None = None
        self.new_turn = False  # conversation="rerank": set by `generate` when it continues a cache
        self.prefill: PrefillState | None = None
        self.call = CallState()
        self.slots = StageSlots()
        self._pending = CallInputs()
        self._record_inputs: tuple | None = None
        self._record: DropRecord | None = None
        self._handles: list = []
        self._vision = VisionAttentionCapture.for_method(model, config.method, adapter)

    @property
    def drops_before_first_layer(self) -> bool:
        """A pre-LLM stage (`layer_list[0] == 0`): no layer holds every token, layer 0's cache included."""
        return bool(self.config.layer_list) and self.config.layer_list[0] == 0

    @property
    def record(self) -> DropRecord | None:
        """Built on first read, off the hot path."""
        if self._record is None and self._record_inputs is not None:
            self._record = make_record(*self._record_inputs)
        return self._record

    def attach(self) -> None:
        self._handles = [
            self.model.register_forward_pre_hook(self._outer_pre_hook, with_kwargs=True),
            self.model.register_forward_hook(self._outer_post_hook, with_kwargs=True),
            self.language_model.register_forward_pre_hook(self._language_model_pre_hook, with_kwargs=True),
            self.language_model.register_forward_hook(self._language_model_post_hook),
        ]
        for index, layer in enumerate(self.layers):
            if self.stage_of_layer[index] > 0:
                # A partial of a bound method, not a closure: a deep copy of the model calls its own engine copy.
                hook = functools.partial(self._on_layer, index)
                self._handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
        # FastV ranks with the input of the layer before a drop; registered last, it sees the stage's own inputs.
        for boundary in self.config.layer_list if self.config.method in LAYER_BEFORE_SCORERS else ():
            hook = functools.partial(self._keep_layer_input, boundary - 1)
            self._handles.append(self.layers[boundary - 1].register_forward_pre_hook(hook, with_kwargs=True))
        if self._vision is not None:
            self._vision.attach()

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._vision is not None:
            self._vision.detach()

    # -- outer model: where are the visual tokens, which labels -------------------------------------------
    def _outer_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict):
        self._pending = capture_call(self.adapter, module, args, kwargs, bool(self.config.layer_list))
        return args, kwargs

    def _outer_post_hook(self, module: nn.Module, args: tuple, kwargs: dict, output):
        pending, self._pending = self._pending, CallInputs()
        if pending.labels is None or getattr(output, "logits", None) is None:
            return output
        labels = stages.gather_labels(pending.labels, self.prefill.stages[-1])
        output.loss = module.loss_function(
            logits=output.logits, labels=labels, vocab_size=output.logits.shape[-1], **pending.loss_kwargs
        )
        return output

    # -- language model: prefill, re-rank or decode -----------------------------------------------------------
    def _language_model_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict):
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            raise ValueError("PyramidDrop expects the language model to be called with inputs_embeds.")
        batch, length = embeds.shape[:2]
        cache = cache_argument(kwargs)
        attention_mask = kwargs.get("attention_mask")
        if isinstance(attention_mask, dict):  # masks per layer type prepared by the outer model (Gemma 3)
            attention_mask = self._pending.padding_mask
        past = self.slots.past_length(cache, attention_mask, length, self.drops_before_first_layer)
        if attention_mask is None:
            attention_mask = torch.ones(batch, past + length, dtype=torch.bool, device=embeds.device)
        elif attention_mask.dim() != 2:
            raise ValueError("PyramidDrop needs a 2-D padding mask (or None), not a prepared 4-D mask.")
        if attention_mask.shape != (batch, past + length):
            raise ValueError(
                f"PyramidDrop got a {tuple(attention_mask.shape)} attention mask for {length} new tokens after "
                f"{past} cached ones; pass a padding mask over the cache plus the new tokens."
            )
        if cache is not None and not isinstance(cache, DynamicCache) and self.config.layer_list:
            raise ValueError(
                f"PyramidDrop needs a DynamicCache (deeper layers hold fewer tokens), got {type(cache).__name__}; "
                "use generate(..., cache_implementation='dynamic') or pass no cache."
            )
        position_ids = self.adapter.positions(kwargs.get("position_ids"), batch, past, length, embeds.device)
        attention_mask = attention_mask.bool()
        self.call = CallState(is_prefill=past == 0, positions=position_ids)
        new_turn, self.new_turn = self.new_turn, False
        if self.call.is_prefill:
            self._start_prefill(embeds, attention_mask, position_ids)
            self.slots.remember(cache)
            return None
        self._check_continuation(cache, past)
        if new_turn and self.config.conversation == "rerank" and self.config.layer_list:
            self._start_rerank(cache, attention_mask, position_ids)
        else:
            self._start_decode(attention_mask[:, -length:], position_ids)
        return None

    def _language_model_post_hook(self, module: nn.Module, args: tuple, output):
        if self.call.is_prefill and self.slots.cache is None:  # called without a cache: the model made one inside
            made = getattr(output, "cache", None)  # `past_key_values` before transformers 5.24 (deprecated since)
            self.slots.remember(made if made is not None else getattr(output, "past_key_values", None))
        if self.call.is_prefill or self.call.rerank:
            prefill = self.prefill
            stage_list, config = list(prefill.stages), self.config
            self._record_inputs = (stage_list, self.stage_of_layer, config, prefill.num_layout_tokens, prefill.frames)
            self._record = None
            self.slots.start([stage.attention_mask for stage in prefill.stages])
        self.call.rerank = False
        return output

    def _start_prefill(self, embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor) -> None:
        vision = (None, None) if self._vision is None else self._vision.take()
        self.prefill = start_prefill(
            self.model,
            self.adapter,
            self.config,
            self._pending,
            embeds,
            attention_mask,
            position_ids,
            prompt_length=self.prompt_length,
            vision=vision,
        )
        self.slots.length = attention_mask.shape[1]

    def _check_continuation(self, cache, past: int) -> None:
        token_mask = self._pending.token_mask
        if self._pending.visual_inputs and token_mask is not None and bool(token_mask.any()):
            raise ValueError(
                "PyramidDrop got visual tokens after the prefill (chunked prefill, or an image in a follow-up turn); "
                "it ranks them once, with the whole prompt: pass the prompt in one call (prefill_chunk_size=None), "
                "or start a new conversation for a new image."
            )
        self.slots.check_continuation(cache, past, self.prefill.stages[0].pool, self.stage_of_layer)
        if self.prefill.boundary is not None:
            self.prefill.boundary.crop(self.slots.length)

    def _start_decode(self, new_mask: torch.Tensor, position_ids: torch.Tensor) -> None:
        self.slots.append(new_mask)
        prefill = self.prefill
        for owner in sorted(set(prefill.layout_of) - {0}):
            shift = 0
            if self.config.position_mode == "compact":  # broadcasts over M-RoPE's leading axis
                shift = prefill.stages[owner].dropped[:, None]
            self.call.stage_inputs[owner] = StageInputs(self.slots.slots[owner], position_ids - shift)

    def _start_rerank(self, cache, attention_mask: torch.Tensor, position_ids: torch.Tensor) -> None:
        """A new turn as a fresh prefill of the whole conversation from the first dropping layer on."""
        instruction_mean = self.config.query == "instruction_mean"
        stage0 = restart_for_new_turn(
            self.prefill, attention_mask, position_ids, self._pending.input_ids, self.prompt_length, instruction_mean
        )
        for layer_index in range(self.first_layer_of_stage[1], len(self.layers)):
            cache.layers[layer_index].reset()  # recomputed in this call from the stored hidden states
        self.call.rerank = True
        self.call.stage_inputs[0] = StageInputs(stage0.attention_mask, stage0.positions, stage0.block_index)
        self.slots.length = attention_mask.shape[1]

    # -- decoder layers: drop at a boundary, then feed the stage its own mask and positions -----------------
    def _on_layer(self, layer_index: int, layer: nn.Module, args: tuple, kwargs: dict):
        stage_index = self.stage_of_layer[layer_index]
        is_first = self.first_layer_of_stage[stage_index] == layer_index
        hidden = args[0] if args else kwargs.pop("hidden_states")
        call = self.call
        if stage_index == 1 and is_first and self.config.conversation == "rerank":
            hidden = self._store_boundary(hidden)
        if (call.is_prefill or call.rerank) and is_first:
            hidden = self._drop(hidden, stage_index, layer, kwargs)
        owner = self.prefill.layout_of[stage_index]
        if owner == 0 and not call.rerank:
            return (hidden, *args[1:]), kwargs
        inputs = call.stage_inputs[owner]
        layer_type = self.layer_types[layer_index]
        if layer_type not in inputs.causal_masks:  # once per stage, layer type and call: same lengths
            inputs.causal_masks[layer_type] = self.adapter.stage_mask(
                layer_type,
                self.language_model.config,
                hidden,
                inputs.attention_mask,
                cache_argument(kwargs),
                layer_index,
                inputs.blocks,
            )
        kwargs.update(
            attention_mask=inputs.causal_masks[layer_type],
            position_embeddings=self._rotary(inputs, layer_type, hidden),
            position_ids=None,  # rotary is precomputed; gaps would read as packed sequences to FA2
        )
        return (hidden, *args[1:]), kwargs

    def _keep_layer_input(self, layer_index: int, layer: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.call.is_prefill:
            hidden = args[0] if args else kwargs["hidden_states"]
            self.call.layer_before[layer_index] = (layer, hidden.detach(), kwargs["position_embeddings"])

    def _store_boundary(self, hidden: torch.Tensor) -> torch.Tensor:
        """Keep what enters the first dropping layer; a re-ranking call continues with the whole conversation."""
        prefill = self.prefill
        if self.call.is_prefill:
            stage0 = prefill.stages[0]
            prefill.boundary = BoundaryStore(
                hidden.detach(), stage0.positions, prefill.token_mask & stage0.attention_mask
            )
            return hidden
        prefill.boundary.append(hidden, self.call.positions)
        return prefill.boundary.hidden if self.call.rerank else hidden

    def _rotary(self, inputs: StageInputs, layer_type: str, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A stage's rotary embeddings for one layer type (Gemma 3's local and global layers differ), once a call."""
        if layer_type not in inputs.position_embeddings:
            inputs.position_embeddings[layer_type] = self.adapter.rotary(
                self.language_model, like, inputs.position_ids, layer_type
            )
        return inputs.position_embeddings[layer_type]

    def _drop(self, hidden: torch.Tensor, stage_index: int, layer: nn.Module, kwargs: dict) -> torch.Tensor:
        prefill = self.prefill
        previous, previous_owner = prefill.stages[stage_index - 1], prefill.layout_of[stage_index - 1]
        ratio = self.config.keep_ratio(stage_index)
        keep = ranking.keep_counts(self.config.method, previous, prefill.groups, ratio, prefill.frames_at(previous))
        if stages.drops_nothing(previous, prefill.groups, keep):
            prefill.stages[stage_index], prefill.layout_of[stage_index] = previous, previous_owner
            return hidden
        ranked_layer = self.first_layer_of_stage[stage_index]
        ranked_hidden = hidden.detach()
        if ranked_layer - 1 in self.call.layer_before:  # the layer before, with its own input and rotary
            ranked_layer -= 1
            layer, ranked_hidden, embeddings = self.call.layer_before[ranked_layer]
        elif previous_owner == 0 and not self.call.rerank:
            embeddings = kwargs["position_embeddings"]  # the model's own, for the whole input
        else:
            embeddings = self._rotary(self.call.stage_inputs[previous_owner], self.layer_types[ranked_layer], hidden)
        layer_type = self.layer_types[ranked_layer]
        window = getattr(self.language_model.config, "sliding_window", None)
        inputs, selected, order = ranking.rank_and_select(
            self.config.method,
            previous,
            keep,
            hidden_states=ranked_hidden,
            boundary_states=hidden.detach(),
            final_norm=getattr(self.language_model, "norm", None),
            layer=layer,
            position_embeddings=embeddings,
            stage=stage_index,
            sample_seeds=prefill.sample_seeds,
            apply_rope=self.adapter.apply_rope,
            **prefill.slot_fields(previous),
            sliding_window=window if layer_type == "sliding_attention" else None,
        )
        hidden, order = ranking.merge_dropped(self.config.method, inputs, selected, hidden, order)
        stage, index = stages.drop_stage(previous, selected, self.config.position_mode, order)
        prefill.stages[stage_index], prefill.layout_of[stage_index] = stage, stage_index
        self.call.stage_inputs[stage_index] = StageInputs(stage.attention_mask, stage.positions, stage.block_index)
        return stages.gather_tokens(hidden, index)
