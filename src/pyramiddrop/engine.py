"""The PyramidDrop engine: forward hooks that rank and drop visual tokens at stage boundaries.

Three hooks, no copied modeling code:
- on the vision-language model: remember where the visual tokens are (the language model only sees
  embeddings) and take the labels, so the loss can be computed on the shortened sequence;
- on the language model: start a prefill (new stage table) when the cache is empty, else extend every stage
  by the call's new tokens (one decode token, several candidate tokens of assisted decoding, or a follow-up
  turn), after matching each stage's table to what its cache layers hold (assisted decoding crops rejected
  candidates);
- on each decoder layer of a later stage: at the stage's first layer in prefill, rank and gather the
  sequence; then hand every layer of the stage its own mask and rotary embeddings.

A boundary at 0 (`layer_list=[0, ...]`) drops before the first decoder layer (a pre-LLM stage: methods that rank
from the projected visual tokens or from the vision tower's attention, captured by `vision_attention.py`).
A merge method (`scoring.MERGES`, e.g. pooling) also rewrites the kept tokens' hidden states before the gather.

Sequences stay batched: after a drop every row holds its kept tokens in original order, right-aligned,
with masked filler slots on the left, so `generate()`'s "last token at index -1" still holds.

What differs per model family comes from the adapter: which tokens are visual (and which of them are layout),
how position ids look (`[batch, seq]`, or with a leading axis such as M-RoPE's `[3, batch, seq]`; they are always
gathered along the sequence), how positions become rotary embeddings and masks per layer type (Gemma 3's
bidirectional image blocks are gathered with the kept tokens), and which video frame a visual token belongs to. Visual tokens are
ranked in pools ("groups"): one per sample, or with `video_pool="frame"` one per video frame.
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.cache_utils import DynamicCache

from pyramiddrop.adapters import ModelAdapter
from pyramiddrop.adapters.masks import MASK_FUNCTIONS
from pyramiddrop.config import PyramidDropConfig
from pyramiddrop.conversation import BoundaryStore, extend_with
from pyramiddrop.scoring import MERGES, PER_FRAME_SCORERS, SCORERS, VISION_ATTENTION_SCORERS, RankInputs
from pyramiddrop.vision_attention import VisionAttentionCapture

IGNORE_INDEX = -100


def _cache_argument(kwargs: dict):
    """The KV cache a module was called with: `cache=` since transformers 5.24, `past_key_values=` before."""
    return kwargs["cache"] if kwargs.get("cache") is not None else kwargs.get("past_key_values")


@dataclass
class Stage:
    """One stage's sequence layout after prefill, all tensors `[batch, seq]` in that stage's coordinates."""

    attention_mask: torch.Tensor  # bool, False for padding and filler
    positions: torch.Tensor  # position ids used in prefill, `[..., batch, seq]` (M-RoPE: a leading axis of 3)
    source_index: torch.Tensor  # position in the original input, -1 for filler
    pool_index: torch.Tensor  # index among the sample's droppable visual tokens, -1 otherwise
    group_index: torch.Tensor  # ranking group (a sample's pool, or one video frame), -1 outside the pool
    query_mask: torch.Tensor  # bool, the rows that rank visual tokens
    dropped: torch.Tensor  # [batch] real tokens dropped before this stage (the compact decode shift)
    block_index: torch.Tensor | None = None  # bidirectional image block of each token (Gemma 3), -1 for text


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


@dataclass
class _StepInputs:
    """What the layers of one stage receive in the current forward call."""

    attention_mask: torch.Tensor  # 2-D, over this stage's cache plus the new tokens
    position_ids: torch.Tensor
    blocks: torch.Tensor | None = None  # bidirectional image blocks (prefill of a family that has them)
    # Per layer type, built once per call: the backend's mask, the rotary (cos, sin) at `position_ids`.
    causal_masks: dict = field(default_factory=dict)
    position_embeddings: dict = field(default_factory=dict)


@dataclass
class _Pending:
    """Captured by the outer hook for the language model's prefill."""

    token_mask: torch.Tensor | None = None
    layout_mask: torch.Tensor | None = None  # layout tokens with their own ids (Pixtral's row breaks)
    video_mask: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    loss_kwargs: dict = field(default_factory=dict)
    visual_inputs: bool = False  # pixels or pre-encoded features came with the call
    padding_mask: torch.Tensor | None = None  # the call's 2-D mask (for language models given prepared masks)
    blocks: torch.Tensor | None = None  # bidirectional image blocks, from the adapter


def _has_visual_inputs(kwargs: dict) -> bool:
    return any(
        value is not None and (key.startswith("pixel_values") or key == "mm_encoder_outputs")
        for key, value in kwargs.items()
    )


class PyramidDropEngine:
    def __init__(self, model: nn.Module, config: PyramidDropConfig, adapter: ModelAdapter) -> None:
        self.model, self.config, self.adapter = model, config, adapter
        self.language_model = adapter.language_model(model)
        self.layers = self.language_model.layers
        self.layer_types = _layer_types(self.language_model.config, len(self.layers))
        self.stage_of_layer = [
            sum(layer >= boundary for boundary in config.layer_list) for layer in range(len(self.layers))
        ]
        self.first_layer_of_stage = [0, *config.layer_list]
        self.stages: list[Stage] = []
        # Per stage, the padding mask over the slots its cache layers hold: the prefill's kept tokens, then
        # every token appended since. `_length` is the same count in input coordinates (stage 0).
        self._slots: list[torch.Tensor] = []
        self._length = 0
        self._cache = None  # weak reference to the cache the last prefill filled
        # Set by `generate` (see api.py): tokens past it (assisted decoding's candidates) never rank.
        self.prompt_length: int | None = None
        # Also set by `generate`: every prefill of one call (use_cache=False runs one per step) draws the same
        # random numbers, so stochastic methods drop the same tokens at every step.
        self.generator_state: torch.Tensor | None = None
        # conversation="rerank": set by `generate` when it continues a cache; the call's first forward re-ranks.
        self.new_turn = False
        self._boundary: BoundaryStore | None = None
        self._rerank_call = False
        self._record: DropRecord | None = None
        self._recorded: tuple | None = None
        self._pending = _Pending()
        self._step: dict[int, _StepInputs] = {}
        self._is_prefill = False
        self._handles: list = []
        self._generator = torch.Generator().manual_seed(config.seed)
        self._vision = self._vision_capture()
        self._vision_prior: torch.Tensor | None = None  # [batch, seq] in input coordinates

    def _vision_capture(self) -> VisionAttentionCapture | None:
        """Methods that rank by the vision tower's attention read it while the tower runs (apply-time check)."""
        if self.config.method not in VISION_ATTENTION_SCORERS:
            return None
        if self.adapter.vision_attention is None:
            raise ValueError(
                f"method {self.config.method!r} ranks by the vision tower's attention per image token, which "
                f"PyramidDrop maps for LLaVA-1.5-style towers (one image token per patch), not for "
                f"{self.adapter.family} models; choose another method (e.g. 'divprune' before the first layer)."
            )
        return VisionAttentionCapture(self.adapter.vision_attention(self.model))

    @property
    def drops_before_first_layer(self) -> bool:
        """A pre-LLM stage (`layer_list[0] == 0`): no layer holds every token, layer 0's cache included."""
        return bool(self.config.layer_list) and self.config.layer_list[0] == 0

    # -- hook management ---------------------------------------------------------------------------------
    def attach(self) -> None:
        self._handles = [
            self.model.register_forward_pre_hook(self._outer_pre_hook, with_kwargs=True),
            self.model.register_forward_hook(self._outer_post_hook, with_kwargs=True),
            self.language_model.register_forward_pre_hook(self._language_model_pre_hook, with_kwargs=True),
            self.language_model.register_forward_hook(self._language_model_post_hook),
        ]
        for index, layer in enumerate(self.layers):
            if self.stage_of_layer[index] > 0:
                self._handles.append(layer.register_forward_pre_hook(self._layer_hook(index), with_kwargs=True))
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
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        self._pending = _Pending(
            token_mask=self.adapter.token_mask(module, input_ids, embeds),
            layout_mask=self.adapter.layout_mask(module, input_ids, embeds),
            video_mask=self.adapter.video_mask(module, input_ids, embeds),
            visual_inputs=_has_visual_inputs(kwargs),
            blocks=self.adapter.attention_blocks(module, kwargs),
        )
        if isinstance(kwargs.get("attention_mask"), torch.Tensor) and kwargs["attention_mask"].dim() == 2:
            self._pending.padding_mask = kwargs["attention_mask"]
        if kwargs.get("fused_lm_head") and self.config.layer_list:
            raise ValueError(
                "PyramidDrop shortens the sequence inside the language model, so TRL's SFTTrainer loss, computed from "
                "the backbone's hidden states against the full-length labels (fused_lm_head=True), cannot line up; "
                "train with pyramiddrop.integrations.trl.PyramidDropSFTTrainer, which takes the model's own loss."
            )
        if kwargs.get("labels") is not None and self.config.layer_list:
            if module.training:
                _check_visual_labels(kwargs["labels"], self._pending.token_mask)
            # The logits come out shorter than the labels; the post-hook computes the loss on gathered labels.
            self._pending.labels = kwargs.pop("labels")
            if "num_items_in_batch" in kwargs:
                self._pending.loss_kwargs["num_items_in_batch"] = kwargs["num_items_in_batch"]
        return args, kwargs

    def _outer_post_hook(self, module: nn.Module, args: tuple, kwargs: dict, output):
        pending, self._pending = self._pending, _Pending()
        if pending.labels is None or getattr(output, "logits", None) is None:
            return output
        source = self.stages[-1].source_index
        gathered = pending.labels.gather(1, source.clamp(min=0)).masked_fill(source < 0, IGNORE_INDEX)
        output.loss = module.loss_function(
            logits=output.logits, labels=gathered, vocab_size=output.logits.shape[-1], **pending.loss_kwargs
        )
        return output

    # -- language model: prefill or decode ------------------------------------------------------------------
    def _language_model_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict):
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            raise ValueError("PyramidDrop expects the language model to be called with inputs_embeds.")
        batch, length = embeds.shape[:2]
        cache = _cache_argument(kwargs)
        attention_mask = kwargs.get("attention_mask")
        if isinstance(attention_mask, dict):  # masks per layer type prepared by the outer model (Gemma 3)
            attention_mask = self._pending.padding_mask
        past = self._past_length(cache, attention_mask, length)
        if attention_mask is None:
            attention_mask = torch.ones(batch, past + length, dtype=torch.bool, device=embeds.device)
        elif attention_mask.dim() != 2:
            raise ValueError("PyramidDrop needs a 2-D padding mask (or None), not a prepared 4-D mask.")
        if attention_mask.shape != (batch, past + length):
            raise ValueError(
                f"PyramidDrop got a {tuple(attention_mask.shape)} attention mask for {length} new tokens after "
                f"{past} cached ones; pass a padding mask over the cache plus the new tokens."
            )
        position_ids = self.adapter.positions(kwargs.get("position_ids"), batch, past, length, embeds.device)
        self._step, self._call_positions = {}, position_ids
        self._is_prefill = past == 0
        new_turn, self.new_turn = self.new_turn, False
        if cache is not None and not isinstance(cache, DynamicCache) and self.config.layer_list:
            raise ValueError(
                f"PyramidDrop needs a DynamicCache (deeper layers hold fewer tokens), got {type(cache).__name__}; "
                "use generate(..., cache_implementation='dynamic') or pass no cache."
            )
        if self._is_prefill:
            self._start_prefill(embeds, attention_mask.bool(), position_ids)
            self._cache = weakref.ref(cache) if cache is not None else None
        else:
            self._check_continuation(cache, past)
            if new_turn and self.config.conversation == "rerank" and self.config.layer_list:
                self._start_rerank(cache, attention_mask.bool(), position_ids)
            else:
                self._start_decode(embeds, attention_mask.bool(), position_ids)
        return None

    def _past_length(self, cache, attention_mask: torch.Tensor | None, length: int) -> int:
        """Tokens already in the cache, in input coordinates. A layer before the first drop holds all of them;
        with a drop before layer 0 every layer holds fewer, and the padding mask (cache plus new tokens) tells."""
        if cache is None:
            return 0
        held = cache.get_seq_length()
        if held == 0 or not self.drops_before_first_layer:
            return held
        return attention_mask.shape[-1] - length if attention_mask is not None else self._length

    def _start_rerank(self, cache, attention_mask: torch.Tensor, position_ids: torch.Tensor) -> None:
        """A new turn as a fresh prefill of the whole conversation from the first dropping layer on."""
        stage0, length = self.stages[0], attention_mask.shape[1]
        stored = self._boundary
        token_mask = extend_with(stored.token_mask, length, False)
        stage0 = Stage(
            attention_mask=attention_mask,
            positions=torch.cat([stored.positions, position_ids], dim=-1),
            source_index=torch.arange(length, device=attention_mask.device).expand_as(attention_mask),
            pool_index=extend_with(stage0.pool_index, length, -1),
            group_index=extend_with(stage0.group_index, length, -1),
            query_mask=self._query_mask(attention_mask, token_mask, None),
            dropped=torch.zeros_like(stage0.dropped),
            block_index=None if stage0.block_index is None else extend_with(stage0.block_index, length, -1),
        )
        self.stages = [stage0] * self.config.num_stages
        if self._vision_prior is not None:
            self._vision_prior = extend_with(self._vision_prior, length, 0.0)
        for layer_index in range(self.first_layer_of_stage[1], len(self.layers)):
            cache.layers[layer_index].reset()  # recomputed in this call from the stored hidden states
        self._rerank_call = True
        self._length = length

    def _check_continuation(self, cache, past: int) -> None:
        """Refuse what the stage tables cannot extend; match them to the cache after a crop."""
        if self._cache is None or self._cache() is not cache:
            raise ValueError(
                "PyramidDrop can only continue from the cache its own last prefill on this model filled (deeper "
                "layers hold only the kept tokens); start from an empty cache, or continue the latest conversation."
            )
        token_mask = self._pending.token_mask
        if self._pending.visual_inputs and token_mask is not None and bool(token_mask.any()):
            raise ValueError(
                "PyramidDrop got visual tokens after the prefill (chunked prefill, or an image in a follow-up turn); "
                "it ranks them once, with the whole prompt: pass the prompt in one call (prefill_chunk_size=None), "
                "or start a new conversation for a new image."
            )
        if self._boundary is not None:
            self._boundary.crop(past)
        if past > self._length:
            raise ValueError(f"the cache holds {past} tokens but PyramidDrop only saw {self._length} go in.")
        if past < self._length:  # cropped (assisted decoding's rejected candidates): every stage loses the same tail
            cut = self._length - past
            if past < self.stages[0].pool_index.shape[1] and bool((self.stages[0].pool_index[:, past:] >= 0).any()):
                raise ValueError("the cache was cropped into the visual tokens; PyramidDrop needs a new prefill.")
            self._slots = [slots[:, :-cut] for slots in self._slots]
            self._length = past
        for layer_index in range(len(self.layers)):  # a DynamicCache (checked above): one layer object each
            expected = self._slots[self.stage_of_layer[layer_index]].shape[1]
            held = cache.get_seq_length(layer_index)
            if held > expected:  # a crop by input-coordinate length misses deeper layers
                cache.layers[layer_index].crop(expected - held)
            elif held != expected:
                raise ValueError(
                    f"decoder layer {layer_index}'s cache holds {held} tokens, PyramidDrop expects {expected}."
                )

    def _start_prefill(self, embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor) -> None:
        if self.generator_state is not None:
            self._generator.set_state(self.generator_state)
        token_mask = self._pending.token_mask
        if token_mask is None:
            token_mask = torch.zeros_like(attention_mask)
        elif token_mask.shape != attention_mask.shape:
            raise ValueError(
                f"PyramidDrop found visual tokens for a {tuple(token_mask.shape)} input but the language model got "
                f"{tuple(attention_mask.shape)}; this model rewrites its input ids, which this adapter does not support."
            )
        pool = self.adapter.droppable_mask(self.model, token_mask, embeds) & attention_mask
        if self._pending.layout_mask is not None:
            pool &= ~self._pending.layout_mask
        length = attention_mask.shape[1]
        arange = torch.arange(length, device=embeds.device).expand_as(attention_mask)
        video = self._pending.video_mask
        frames = None
        if video is not None and bool((video & pool).any()):
            frames = self.adapter.frame_index(self.model, video & pool, position_ids)
            if self.config.method in PER_FRAME_SCORERS and self.config.video_pool != "frame":
                raise ValueError(
                    f"method {self.config.method!r} pools each video frame's grid: use video_pool='frame' for "
                    "videos (one ranking group per frame)."
                )
        stage0 = Stage(
            attention_mask=attention_mask,
            positions=position_ids,
            source_index=arange,
            pool_index=torch.where(pool, pool.long().cumsum(1) - 1, -1),
            group_index=self._pool_groups(pool, frames),
            query_mask=self._query_mask(attention_mask, token_mask, self._pending.labels),
            dropped=torch.zeros(attention_mask.shape[0], dtype=torch.long, device=embeds.device),
            block_index=self._pending.blocks,
        )
        self.stages = [stage0] * self.config.num_stages
        self._length = length
        self._prefill_token_mask = token_mask
        self._vision_prior = self._vision_scores(token_mask) if self._vision is not None else None
        self._num_layout_tokens = (token_mask & attention_mask & ~pool).sum(1)
        self._frames = frames

    def _vision_scores(self, token_mask: torch.Tensor) -> torch.Tensor | None:
        """The tower's score of every image token, placed where the model scattered its features."""
        scores = self._vision.take()
        if scores is None:
            return None
        if scores.numel() != int(token_mask.sum()):
            raise ValueError(
                f"method {self.config.method!r}: the vision tower scored {scores.numel()} patches for "
                f"{int(token_mask.sum())} image tokens; this model does not place one token per patch."
            )
        return torch.zeros(token_mask.shape, device=token_mask.device).masked_scatter(
            token_mask, scores.to(token_mask.device)
        )

    def _pool_groups(self, pool: torch.Tensor, frames: torch.Tensor | None) -> torch.Tensor:
        """Ranking groups, numbered 0..G-1 over the batch; each group lies in one row.

        One group per sample, or with `video_pool="frame"` one per video frame plus one for the sample's images.
        Sets `_group_size[g]` (visual tokens of group g at stage 0) and `_group_row[g]`.
        """
        batch = pool.shape[0]
        rows = torch.arange(batch, device=pool.device)[:, None].expand_as(pool)
        group = rows
        if frames is not None and self.config.video_pool == "frame":
            group = torch.where(frames >= 0, frames + batch, rows)  # frame ids are unique in the batch
        values, dense = torch.unique(group[pool], return_inverse=True)
        group = torch.full_like(rows, -1).masked_scatter(pool, dense)
        self._group_size = torch.bincount(dense, minlength=values.numel())
        self._group_row = torch.zeros_like(self._group_size).scatter(0, dense, rows[pool])
        return group

    def _start_decode(self, embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor) -> None:
        new_mask = attention_mask[:, -embeds.shape[1] :]
        for stage_index in range(self.config.num_stages):
            self._slots[stage_index] = torch.cat([self._slots[stage_index], new_mask], dim=1)
            stage = self.stages[stage_index]
            if stage is self.stages[0]:
                continue
            if stage is self.stages[stage_index - 1]:
                self._step[stage_index] = self._step[stage_index - 1]
                continue
            shift = stage.dropped[:, None] if self.config.position_mode == "compact" else 0  # broadcasts over M-RoPE
            self._step[stage_index] = self._make_step(self._slots[stage_index], position_ids - shift)
        self._length += embeds.shape[1]

    def _query_mask(self, attention_mask: torch.Tensor, token_mask: torch.Tensor, labels: torch.Tensor | None):
        if labels is not None and self.model.training:
            # Training: the token right before each answer span; several spans give several queries.
            answer = labels != IGNORE_INDEX
            starts = answer[:, 1:] & ~answer[:, :-1]
            return torch.cat([starts, torch.zeros_like(starts[:, :1])], dim=1) & attention_mask
        length = attention_mask.shape[1]
        positions = torch.arange(length, device=attention_mask.device)
        prompt = attention_mask
        if self.prompt_length is not None:  # generate's candidate or generated tokens past the prompt never rank
            prompt = attention_mask & (positions < self.prompt_length)
        if self.config.query == "instruction_mean":
            last_visual = torch.where(token_mask, positions, -1).max(dim=1, keepdim=True).values
            return prompt & (positions > last_visual)
        last_real = torch.where(prompt, positions, -1).max(dim=1, keepdim=True).values
        return positions == last_real

    def _language_model_post_hook(self, module: nn.Module, args: tuple, output):
        if self._is_prefill and self._cache is None:  # called without a cache: the model made one inside
            made = getattr(output, "past_key_values", None) or getattr(output, "cache", None)
            self._cache = weakref.ref(made) if made is not None else None
        if self._is_prefill or self._rerank_call:  # the record is built on first read, off the hot path
            self._recorded, self._record = (list(self.stages), self._num_layout_tokens, self._frames), None
            self._slots = [stage.attention_mask for stage in self.stages]
        self._rerank_call = False
        return output

    @property
    def record(self) -> DropRecord | None:
        if self._record is None and self._recorded is not None:
            self._record = self._make_record(*self._recorded)
        return self._record

    # -- decoder layers: drop at a boundary, then feed the stage its own mask and positions -----------------
    def _layer_hook(self, layer_index: int):
        # A partial of a bound method, not a closure: a deep copy of the model then calls its own engine copy.
        return functools.partial(self._on_layer, layer_index)

    def _on_layer(self, layer_index: int, layer: nn.Module, args: tuple, kwargs: dict):
        stage_index = self.stage_of_layer[layer_index]
        is_first = self.first_layer_of_stage[stage_index] == layer_index
        hidden = args[0] if args else kwargs.pop("hidden_states")
        if stage_index == 1 and is_first and self.config.conversation == "rerank":
            hidden = self._store_boundary(hidden)
        if (self._is_prefill or self._rerank_call) and is_first:
            hidden = self._drop(hidden, stage_index, layer, kwargs)
        if self.stages[stage_index] is self.stages[0] and not self._rerank_call:
            return (hidden, *args[1:]), kwargs
        step = self._step[stage_index]
        layer_type = self.layer_types[layer_index]
        if layer_type not in step.causal_masks:  # once per stage, layer type and call: same lengths
            cache = _cache_argument(kwargs)
            step.causal_masks[layer_type] = self._causal_mask(step, hidden, cache, layer_index, layer_type)
        kwargs.update(
            attention_mask=step.causal_masks[layer_type],
            position_embeddings=self._rotary(step, layer_type, hidden),
            position_ids=None,  # rotary is precomputed; gaps would read as packed sequences to FA2
        )
        return (hidden, *args[1:]), kwargs

    def _store_boundary(self, hidden: torch.Tensor) -> torch.Tensor:
        """Keep what enters the first dropping layer; a re-ranking call continues with the whole conversation."""
        if self._is_prefill:
            stage0 = self.stages[0]
            self._boundary = BoundaryStore(
                hidden.detach(), stage0.positions, self._prefill_token_mask & stage0.attention_mask
            )
            return hidden
        self._boundary.append(hidden, self._call_positions)
        return self._boundary.hidden if self._rerank_call else hidden

    def _make_step(self, mask: torch.Tensor, positions: torch.Tensor, blocks: torch.Tensor | None = None):
        return _StepInputs(mask, positions, blocks)

    def _rotary(self, step: _StepInputs, layer_type: str, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The stage's rotary embeddings for one layer type (Gemma 3's local and global layers differ), once a call."""
        if layer_type not in step.position_embeddings:
            step.position_embeddings[layer_type] = self.adapter.rotary(
                self.language_model, like, step.position_ids, layer_type
            )
        return step.position_embeddings[layer_type]

    def _causal_mask(self, step: _StepInputs, hidden: torch.Tensor, cache, layer_index: int, layer_type: str):
        return self.adapter.stage_mask(
            layer_type, self.language_model.config, hidden, step.attention_mask, cache, layer_index, step.blocks
        )

    def _drop(self, hidden: torch.Tensor, stage_index: int, layer: nn.Module, kwargs: dict) -> torch.Tensor:
        previous = self.stages[stage_index - 1]
        pool = previous.pool_index >= 0
        # Per group (a sample's pool, or a video frame): int(N_g * ratio) of its stage-0 tokens, at least one.
        available = torch.bincount(previous.group_index[pool], minlength=self._group_size.numel())
        ratio = self.config.keep_ratio(stage_index)
        keep = (self._group_size.double() * ratio).floor().long().clamp(min=1)
        has_query = previous.query_mask.any(1)[self._group_row]
        keep = torch.where(has_query, torch.minimum(keep, available), available)
        if bool((keep >= available).all()):
            self.stages[stage_index] = previous
            if previous is not self.stages[0]:
                self._step[stage_index] = self._step[stage_index - 1]
            elif self._rerank_call:  # the stage runs on the whole conversation: its own mask and rotary
                self._step[stage_index] = self._make_step(
                    previous.attention_mask, previous.positions, previous.block_index
                )
            return hidden

        layer_type = self.layer_types[self.first_layer_of_stage[stage_index]]
        if previous is self.stages[0] and self._rerank_call:
            embeddings = self.adapter.rotary(self.language_model, hidden, previous.positions, layer_type)
        elif previous is self.stages[0]:
            embeddings = kwargs["position_embeddings"]
        else:
            embeddings = self._rotary(self._step[stage_index - 1], layer_type, hidden)
        window = getattr(self.language_model.config, "sliding_window", None)
        vision_scores = None
        if self._vision_prior is not None:
            vision_scores = self._vision_prior.gather(1, previous.source_index.clamp(min=0))
        with torch.no_grad():
            inputs = RankInputs(
                hidden_states=hidden.detach(),
                layer=layer,
                position_embeddings=embeddings,
                attention_mask=previous.attention_mask,
                query_mask=previous.query_mask,
                visual_index=previous.pool_index,
                stage=stage_index,
                generator=self._generator,
                apply_rope=self.adapter.apply_rope,
                group_index=previous.group_index,
                keep=keep,
                vision_scores=vision_scores,
                sliding_window=window if layer_type == "sliding_attention" else None,
            )
            scores = SCORERS[self.config.method](inputs).float().masked_fill(~pool, float("-inf"))
            # A query that is itself a visual token (an answer right after the image, in training) is kept: later
            # stages rank with it.
            scores = scores.masked_fill(pool & previous.query_mask, float("inf"))
            selected = _top_per_group(scores, previous.group_index, keep)
            kept = previous.attention_mask & (~pool | selected)
            removed = previous.attention_mask & ~kept
        if self.config.method in MERGES:  # the kept tokens summarise the dropped ones (with their gradient)
            hidden = MERGES[self.config.method](inputs, selected, hidden)

        new_length = int(kept.sum(1).max())
        positions = torch.arange(kept.shape[1], device=kept.device)
        index = torch.sort(torch.where(kept, positions, -1), dim=1).values[:, -new_length:]
        filler = index < 0
        index = index.clamp(min=0)

        def take(values: torch.Tensor, fill: int | bool) -> torch.Tensor:
            return values.gather(1, index).masked_fill(filler, fill)

        positions = previous.positions
        if self.config.position_mode == "compact":
            positions = positions - removed.long().cumsum(1)
        # Positions may carry leading axes (M-RoPE): gather along the sequence, kept tokens keep their values.
        positions = positions.gather(-1, index.expand(*positions.shape[:-2], *index.shape)).masked_fill(filler, 0)
        stage = Stage(
            attention_mask=~filler,
            positions=positions,
            source_index=take(previous.source_index, -1),
            pool_index=take(torch.where(kept, previous.pool_index, -1), -1),
            group_index=take(torch.where(kept, previous.group_index, -1), -1),
            query_mask=take(previous.query_mask, False),
            dropped=previous.dropped + removed.sum(1),
            block_index=None if previous.block_index is None else take(previous.block_index, -1),
        )
        self.stages[stage_index] = stage
        self._step[stage_index] = self._make_step(stage.attention_mask, stage.positions, stage.block_index)
        return hidden.gather(1, index[..., None].expand(-1, -1, hidden.shape[-1]))

    # -- record ---------------------------------------------------------------------------------------------
    def _make_record(
        self, stages: list[Stage], num_layout_tokens: torch.Tensor, frames: torch.Tensor | None
    ) -> DropRecord:
        stage0 = stages[0]
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
        num_visual = stage0.pool_index.max(dim=1).values + 1
        kept = [
            [stage.pool_index[row][stage.pool_index[row] >= 0].cpu() for stage in stages]
            for row in range(stage0.pool_index.shape[0])
        ]
        per_stage_tokens = torch.stack([stage.attention_mask.sum(1) for stage in stages], dim=1)
        per_stage_visual = torch.stack([(stage.pool_index >= 0).sum(1) for stage in stages], dim=1)
        layer_stage = torch.tensor(self.stage_of_layer, device=per_stage_tokens.device)
        layout = num_layout_tokens[:, None]
        return DropRecord(
            layer_list=list(self.config.layer_list),
            position_mode=self.config.position_mode,
            num_visual_tokens=num_visual.tolist(),
            num_layout_tokens=num_layout_tokens.tolist(),
            kept_visual_indices=kept,
            tokens_per_layer=per_stage_tokens[:, layer_stage].cpu(),
            visual_tokens_per_layer=(per_stage_visual[:, layer_stage] + layout).cpu(),
            kept_positions=stages[-1].source_index.cpu(),
            visual_frame_index=visual_frames,
        )


def _check_visual_labels(labels: torch.Tensor, token_mask: torch.Tensor | None) -> None:
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


def _top_per_group(scores: torch.Tensor, group: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Select the `keep[g]` highest-scoring tokens of every group g (`group`: [batch, seq], -1 outside any group).

    Sort by score, then (stably) by group: each group becomes a run ordered by score, and a token's rank in its
    group is its distance from the run's start. Ties go to the earlier token.
    """
    order = scores.argsort(dim=1, descending=True, stable=True)
    grouped = group.gather(1, order)
    grouped = torch.where(grouped < 0, keep.numel(), grouped)  # tokens outside any group sort last
    regroup = grouped.argsort(dim=1, stable=True)
    order, grouped = order.gather(1, regroup), grouped.gather(1, regroup)
    rank = torch.arange(grouped.shape[1], device=grouped.device) - torch.searchsorted(grouped, grouped)
    limit = torch.cat([keep, keep.new_zeros(1)])[grouped]
    return torch.zeros_like(group, dtype=torch.bool).scatter(1, order, rank < limit)


def _layer_types(config, num_layers: int) -> list[str]:
    """Attention type of every decoder layer (`config.layer_types`, else sliding for all if a window is set)."""
    types = list(getattr(config, "layer_types", None) or [])
    if not types:
        types = ["sliding_attention" if getattr(config, "sliding_window", None) else "full_attention"] * num_layers
    unknown = sorted(set(types) - set(MASK_FUNCTIONS))
    if unknown:
        raise ValueError(
            f"PyramidDrop builds per-stage masks for {sorted(MASK_FUNCTIONS)} layers; this language model has "
            f"layers of type {unknown}, which it does not support."
        )
    return types
