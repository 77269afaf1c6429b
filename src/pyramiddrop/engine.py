"""The PyramidDrop engine: forward hooks that rank and drop visual tokens at stage boundaries.

Three hooks, no copied modeling code:
- on the vision-language model: remember where the visual tokens are (the language model only sees
  embeddings) and take the labels, so the loss can be computed on the shortened sequence;
- on the language model: start a prefill (new stage table) or a decode step (extend each stage's mask);
- on each decoder layer of a later stage: at the stage's first layer in prefill, rank and gather the
  sequence; then hand every layer of the stage its own mask and rotary embeddings.

Sequences stay batched: after a drop every row holds its kept tokens in original order, right-aligned,
with masked filler slots on the left, so `generate()`'s "last token at index -1" still holds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import create_causal_mask

from pyramiddrop.adapters import ModelAdapter
from pyramiddrop.config import PyramidDropConfig
from pyramiddrop.scoring import SCORERS, RankInputs

IGNORE_INDEX = -100
_NOT_BUILT = object()


@dataclass
class Stage:
    """One stage's sequence layout after prefill, all tensors `[batch, seq]` in that stage's coordinates."""

    attention_mask: torch.Tensor  # bool, False for padding and filler
    positions: torch.Tensor  # position ids used in prefill
    source_index: torch.Tensor  # position in the original input, -1 for filler
    pool_index: torch.Tensor  # index among the sample's droppable visual tokens, -1 otherwise
    query_mask: torch.Tensor  # bool, the rows that rank visual tokens
    dropped: torch.Tensor  # [batch] real tokens dropped before this stage (the compact decode shift)


@dataclass
class DropRecord:
    """What the last prefill did, per sample. Read it with `pyramiddrop.get_drop_record(model)`.

    - `num_visual_tokens[b]`: the sample's droppable visual tokens N_b (all images of the sample together;
      LLaVA-NeXT row-newline tokens are visual but never dropped and counted in `num_layout_tokens`).
    - `kept_visual_indices[b][s]`: sorted indices in `0..N_b-1` of the visual tokens alive in stage `s`
      (stage 0 holds all of them).
    - `tokens_per_layer[b, l]` / `visual_tokens_per_layer[b, l]`: real tokens (visual tokens) that decoder
      layer `l` processed for sample `b`.
    - `kept_positions[b, j]`: which input position the j-th output position comes from (-1 for filler);
      use it to align logits with full-length inputs or labels.
    """

    layer_list: list[int]
    position_mode: str
    num_visual_tokens: list[int]
    num_layout_tokens: list[int]
    kept_visual_indices: list[list[torch.Tensor]]
    tokens_per_layer: torch.Tensor
    visual_tokens_per_layer: torch.Tensor
    kept_positions: torch.Tensor


@dataclass
class _StepInputs:
    """What the layers of one stage receive in the current forward call."""

    attention_mask: torch.Tensor  # 2-D, over this stage's cache plus the new tokens
    position_embeddings: tuple[torch.Tensor, torch.Tensor]
    position_ids: torch.Tensor
    causal_mask: object = None  # the backend's mask, built at the stage's first layer


@dataclass
class _Pending:
    """Captured by the outer hook for the language model's prefill."""

    token_mask: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    loss_kwargs: dict = field(default_factory=dict)


class PyramidDropEngine:
    def __init__(self, model: nn.Module, config: PyramidDropConfig, adapter: ModelAdapter) -> None:
        self.model, self.config, self.adapter = model, config, adapter
        self.language_model = adapter.language_model(model)
        self.layers = self.language_model.layers
        self.stage_of_layer = [
            sum(layer >= boundary for boundary in config.layer_list) for layer in range(len(self.layers))
        ]
        self.first_layer_of_stage = [0, *config.layer_list]
        self.stages: list[Stage] = []
        self.prefill_length = 0
        self._record: DropRecord | None = None
        self._recorded: tuple | None = None
        self._pending = _Pending()
        self._step: dict[int, _StepInputs] = {}
        self._is_prefill = False
        self._handles: list = []
        self._generator = torch.Generator().manual_seed(config.seed)

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

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # -- outer model: where are the visual tokens, which labels -------------------------------------------
    def _outer_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        self._pending = _Pending(token_mask=self.adapter.token_mask(module, input_ids, kwargs.get("inputs_embeds")))
        if kwargs.get("labels") is not None and self.config.layer_list:
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
        cache = kwargs.get("past_key_values")
        past = cache.get_seq_length() if cache is not None else 0
        attention_mask = kwargs.get("attention_mask")
        if attention_mask is None:
            attention_mask = torch.ones(batch, past + length, dtype=torch.bool, device=embeds.device)
        elif attention_mask.dim() != 2:
            raise ValueError("PyramidDrop needs a 2-D padding mask (or None), not a prepared 4-D mask.")
        position_ids = kwargs.get("position_ids")
        if position_ids is None:
            position_ids = torch.arange(past, past + length, device=embeds.device)[None]
        position_ids = position_ids.expand(batch, -1)
        self._step = {}
        self._is_prefill = past == 0
        if cache is not None and not isinstance(cache, DynamicCache) and self.config.layer_list:
            raise ValueError(
                f"PyramidDrop needs a DynamicCache (deeper layers hold fewer tokens), got {type(cache).__name__}; "
                "use generate(..., cache_implementation='dynamic') or pass no cache."
            )
        if self._is_prefill:
            self._start_prefill(embeds, attention_mask.bool(), position_ids)
        else:
            self._start_decode(embeds, attention_mask.bool(), position_ids)
        return None

    def _start_prefill(self, embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor) -> None:
        token_mask = self._pending.token_mask
        if token_mask is None:
            token_mask = torch.zeros_like(attention_mask)
        elif token_mask.shape != attention_mask.shape:
            raise ValueError(
                f"PyramidDrop found visual tokens for a {tuple(token_mask.shape)} input but the language model got "
                f"{tuple(attention_mask.shape)}; this model rewrites its input ids, which this adapter does not support."
            )
        pool = self.adapter.droppable_mask(self.model, token_mask, embeds) & attention_mask
        length = attention_mask.shape[1]
        arange = torch.arange(length, device=embeds.device).expand_as(attention_mask)
        stage0 = Stage(
            attention_mask=attention_mask,
            positions=position_ids,
            source_index=arange,
            pool_index=torch.where(pool, pool.long().cumsum(1) - 1, -1),
            query_mask=self._query_mask(attention_mask, token_mask, self._pending.labels),
            dropped=torch.zeros(attention_mask.shape[0], dtype=torch.long, device=embeds.device),
        )
        self.stages = [stage0] * self.config.num_stages
        self.prefill_length = length
        self._num_layout_tokens = (token_mask & attention_mask & ~pool).sum(1)

    def _start_decode(self, embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor) -> None:
        new_mask = attention_mask[:, self.prefill_length :]
        for stage_index in range(1, self.config.num_stages):
            stage = self.stages[stage_index]
            if stage is self.stages[0]:
                continue
            if stage is self.stages[stage_index - 1]:
                self._step[stage_index] = self._step[stage_index - 1]
                continue
            shift = stage.dropped[:, None] if self.config.position_mode == "compact" else 0
            mask = torch.cat([stage.attention_mask, new_mask], dim=1)
            self._step[stage_index] = self._make_step(mask, position_ids - shift, embeds)

    def _query_mask(self, attention_mask: torch.Tensor, token_mask: torch.Tensor, labels: torch.Tensor | None):
        if labels is not None and self.model.training:
            # Training: the token right before each answer span; several spans give several queries.
            answer = labels != IGNORE_INDEX
            starts = answer[:, 1:] & ~answer[:, :-1]
            return torch.cat([starts, torch.zeros_like(starts[:, :1])], dim=1) & attention_mask
        length = attention_mask.shape[1]
        positions = torch.arange(length, device=attention_mask.device)
        if self.config.query == "instruction_mean":
            last_visual = torch.where(token_mask, positions, -1).max(dim=1, keepdim=True).values
            return attention_mask & (positions > last_visual)
        last_real = torch.where(attention_mask, positions, -1).max(dim=1, keepdim=True).values
        return positions == last_real

    def _language_model_post_hook(self, module: nn.Module, args: tuple, output):
        if self._is_prefill:  # the record is built on first read, off the hot path
            self._recorded, self._record = (list(self.stages), self._num_layout_tokens), None
        return output

    @property
    def record(self) -> DropRecord | None:
        if self._record is None and self._recorded is not None:
            self._record = self._make_record(*self._recorded)
        return self._record

    # -- decoder layers: drop at a boundary, then feed the stage its own mask and positions -----------------
    def _layer_hook(self, layer_index: int):
        stage_index = self.stage_of_layer[layer_index]
        is_first = self.first_layer_of_stage[stage_index] == layer_index

        def hook(layer: nn.Module, args: tuple, kwargs: dict):
            hidden = args[0] if args else kwargs.pop("hidden_states")
            if self._is_prefill and is_first:
                hidden = self._drop(hidden, stage_index, layer, kwargs)
            if self.stages[stage_index] is self.stages[0]:
                return (hidden, *args[1:]), kwargs
            step = self._step[stage_index]
            if step.causal_mask is _NOT_BUILT:  # once per stage and call: all its layers see the same lengths
                step.causal_mask = self._causal_mask(step, hidden, kwargs.get("past_key_values"), layer_index)
            kwargs.update(
                attention_mask=step.causal_mask,
                position_embeddings=step.position_embeddings,
                position_ids=None,  # rotary is precomputed; gaps would read as packed sequences to FA2
            )
            return (hidden, *args[1:]), kwargs

        return hook

    def _make_step(self, mask: torch.Tensor, positions: torch.Tensor, like: torch.Tensor) -> _StepInputs:
        embeddings = self.adapter.rotary(self.language_model, like, positions)
        return _StepInputs(mask, embeddings, positions, causal_mask=_NOT_BUILT)

    def _causal_mask(self, step: _StepInputs, hidden: torch.Tensor, cache, layer_index: int):
        return create_causal_mask(
            config=self.language_model.config,
            inputs_embeds=hidden,
            attention_mask=step.attention_mask,
            past_key_values=cache,
            position_ids=step.position_ids,
            layer_idx=layer_index,
        )

    def _drop(self, hidden: torch.Tensor, stage_index: int, layer: nn.Module, kwargs: dict) -> torch.Tensor:
        previous = self.stages[stage_index - 1]
        pool = previous.pool_index >= 0
        available = pool.sum(1)
        original = self.stages[0].pool_index.max(dim=1).values + 1  # N_b
        ratio = self.config.keep_ratio(stage_index)
        keep = torch.where(original > 0, (original.double() * ratio).floor().long().clamp(min=1), 0)
        keep = torch.where(previous.query_mask.any(1), torch.minimum(keep, available), available)
        if bool((keep >= available).all()):
            self.stages[stage_index] = previous
            if previous is not self.stages[0]:
                self._step[stage_index] = self._step[stage_index - 1]
            return hidden

        if previous is self.stages[0]:
            embeddings = kwargs["position_embeddings"]
        else:
            embeddings = self._step[stage_index - 1].position_embeddings
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
            )
            scores = SCORERS[self.config.method](inputs).float().masked_fill(~pool, float("-inf"))
            top = scores.topk(int(keep.max()), dim=-1).indices
            chosen = torch.arange(top.shape[1], device=top.device)[None] < keep[:, None]
            selected = torch.zeros_like(pool).scatter(1, top, chosen)
            kept = previous.attention_mask & (~pool | selected)
            removed = previous.attention_mask & ~kept

        new_length = int(kept.sum(1).max())
        positions = torch.arange(kept.shape[1], device=kept.device)
        index = torch.sort(torch.where(kept, positions, -1), dim=1).values[:, -new_length:]
        filler = index < 0
        index = index.clamp(min=0)

        def take(values: torch.Tensor, fill: int | bool) -> torch.Tensor:
            return values.gather(1, index).masked_fill(filler, fill)

        if self.config.position_mode == "compact":
            new_positions = take(previous.positions - removed.long().cumsum(1), 0)
        else:
            new_positions = take(previous.positions, 0)
        stage = Stage(
            attention_mask=~filler,
            positions=new_positions,
            source_index=take(previous.source_index, -1),
            pool_index=take(torch.where(kept, previous.pool_index, -1), -1),
            query_mask=take(previous.query_mask, False),
            dropped=previous.dropped + removed.sum(1),
        )
        self.stages[stage_index] = stage
        self._step[stage_index] = self._make_step(stage.attention_mask, stage.positions, hidden)
        return hidden.gather(1, index[..., None].expand(-1, -1, hidden.shape[-1]))

    # -- record ---------------------------------------------------------------------------------------------
    def _make_record(self, stages: list[Stage], num_layout_tokens: torch.Tensor) -> DropRecord:
        stage0 = stages[0]
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
        )
