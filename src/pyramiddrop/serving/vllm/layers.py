"""The language model's layer loop with PyramidDrop: at each stage boundary every request in its prefill ranks
its visual tokens and keeps the top `max(1, int(N * ratio))`; later layers see only the kept tokens (and the text)
through their own attention metadata (pyramiddrop.serving.vllm.metadata), in compact or original positions.

Requests in decode carry what their prefill removed (pyramiddrop.serving.vllm.requests): in stage s their
sequence is `removed[s]` tokens shorter, and in compact mode so are their positions. The output has one row per
scheduled token, as vLLM expects; the rows of dropped tokens are zeros (only each request's last row is sampled).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pyramiddrop.config import PyramidDropConfig
from pyramiddrop.engine import stages
from pyramiddrop.scoring import LAYER_BEFORE_SCORERS
from pyramiddrop.serving.vllm.metadata import StageLayout, slot_mapping, stage_metadata
from pyramiddrop.serving.vllm.requests import RequestDrops, StepRequests, patch_model_runner
from pyramiddrop.serving.vllm.scores import pdrop_scores


@dataclass
class _Rows:
    """The tokens alive in the current stage, one entry per row of the hidden states."""

    index: torch.Tensor  # row in the step's flat tokens
    request: torch.Tensor  # row in the batch, -1 for padding

    def select(self, keep: torch.Tensor) -> _Rows:
        return _Rows(self.index[keep], self.request[keep])


@dataclass
class _Step:
    requests: StepRequests
    computed: list[int]  # tokens of each request already cached (input coordinates)
    drops: list[RequestDrops]
    prefill: list[bool]
    # Each prefill request with visual tokens, by batch row: its layout as a batch of one, in the engine's terms
    # (pyramiddrop.engine.stages), and its ranking groups.
    layouts: dict[int, stages.Stage] = field(default_factory=dict)
    groups: dict[int, stages.Groups] = field(default_factory=dict)


class DropRuntime:
    """Per-model PyramidDrop state in a vLLM worker: the schedule and each running request's drops."""

    def __init__(self, config: PyramidDropConfig, vllm_config) -> None:
        self.config = config
        self.boundaries = list(config.layer_list)  # stage s starts at decoder layer boundaries[s - 1]
        self.rank_layer_before = config.method in LAYER_BEFORE_SCORERS  # FastV: the layer before the drop ranks
        self.block_size = vllm_config.cache_config.block_size
        self.dtype = vllm_config.model_config.dtype
        self.drops: dict[str, RequestDrops] = {}
        self.requests: StepRequests | None = None
        # Set by the model's embed_input_ids in the same step: the visual tokens, and those that are layout (never
        # dropped, LLaVA-NeXT's row ends).
        self.visual_mask: torch.Tensor | None = None
        self.layout_mask: torch.Tensor | None = None
        self._slots_checked = False
        patch_model_runner()

    def begin_step(self, requests: StepRequests, live) -> None:
        self.requests = requests
        for request_id in [request_id for request_id in self.drops if request_id not in live]:
            del self.drops[request_id]  # finished, aborted or preempted (recomputed by a new prefill)

    def run(self, language_model, positions: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        from vllm.forward_context import get_forward_context

        context = get_forward_context()
        names = [layer.self_attn.attn.layer_name for layer in language_model.layers]
        shared = context.attn_metadata.get(names[0]) if isinstance(context.attn_metadata, dict) else None
        requests, visual, layout = self.requests, self.visual_mask, self.layout_mask
        self.requests = self.visual_mask = self.layout_mask = None
        if shared is None or requests is None or not requests.ids or not self.boundaries:  # profiling, warm-up
            return language_model(None, positions, None, inputs_embeds=embeds)
        step, rows = self._start(shared, requests, visual, layout, positions)
        context.attn_metadata, context.slot_mapping = dict(context.attn_metadata), dict(context.slot_mapping)
        hidden, residual, stage, before = embeds, None, 0, None
        for index, layer in enumerate(language_model.layers):
            if stage < len(self.boundaries) and index == self.boundaries[stage]:
                stage += 1
                ranking = before if before is not None else (layer, hidden, residual, positions)
                hidden, residual, positions, rows = self._drop(stage, ranking, step, hidden, residual, positions, rows)
                self._install(context, names, stage, step, rows, shared, layer)
            if self.rank_layer_before and stage < len(self.boundaries) and index == self.boundaries[stage] - 1:
                # FastV ranks with this layer's attention; its fused norm adds the residual in place, so copy
                before = (layer, hidden.clone(), None if residual is None else residual.clone(), positions)
            hidden, residual = layer(positions, hidden, residual)
        hidden, _ = language_model.norm(hidden, residual)
        out = hidden.new_zeros(embeds.shape[0], hidden.shape[-1])
        return out.index_copy_(0, rows.index, hidden)

    # -- the step's requests ------------------------------------------------------------------------------------
    def _start(self, shared, requests: StepRequests, visual, layout, positions: torch.Tensor):
        count, num_tokens = len(requests.ids), positions.shape[-1]  # positions: [tokens] or M-RoPE [3, tokens]
        starts = shared.query_start_loc[: count + 1].cpu().long()
        query_lens = (starts[1:] - starts[:-1]).tolist()
        computed = [int(s) - q for s, q in zip(shared.seq_lens[:count].cpu().tolist(), query_lens)]
        actual = int(starts[-1])
        self._check_slots(shared, query_lens, computed, actual)
        request = torch.full((num_tokens,), -1, dtype=torch.long)
        request[:actual] = torch.repeat_interleave(torch.arange(count), torch.tensor(query_lens))
        is_visual, is_layout = (self._flags(mask, actual, num_tokens) for mask in (visual, layout))
        num_visual = torch.bincount(request[is_visual], minlength=count).tolist()
        drops, prefill = [], []
        for row, request_id in enumerate(requests.ids):
            first = computed[row] == 0
            if num_visual[row] and not first:
                raise RuntimeError(
                    f"PyramidDrop: request {request_id} got visual tokens after its first step (chunked prefill or a "
                    "prefix cache hit); serve with --no-enable-chunked-prefill --no-enable-prefix-caching."
                )
            if first and num_visual[row] and query_lens[row] < requests.prompt_lengths[row]:
                raise RuntimeError(
                    f"PyramidDrop: request {request_id}'s prompt ({requests.prompt_lengths[row]} tokens) was split "
                    f"across steps ({query_lens[row]} in the first); its visual tokens and last token must be in one "
                    "prefill: raise --max-num-batched-tokens to at least max_model_len."
                )
            if first:
                self.drops[request_id] = RequestDrops([0] * (len(self.boundaries) + 1))
            elif request_id not in self.drops:
                raise RuntimeError(f"PyramidDrop: request {request_id} decodes without a recorded prefill.")
            drops.append(self.drops[request_id])
            prefill.append(first)
        rows = _Rows(torch.arange(num_tokens), request)
        step = _Step(requests, computed, drops, prefill)
        for row in range(count):
            if prefill[row] and num_visual[row]:
                span = slice(int(starts[row]), int(starts[row + 1]))
                self._first_stage(step, row, is_visual[span], is_layout[span], positions[..., span])
        return step, rows

    @staticmethod
    def _flags(mask: torch.Tensor | None, actual: int, num_tokens: int) -> torch.Tensor:
        """A per-token mask of the scheduled tokens on the CPU, False for padding rows."""
        flags = torch.zeros(num_tokens, dtype=torch.bool)
        if mask is not None:
            flags[: min(actual, mask.numel())] = mask[:actual].cpu()
        return flags

    def _first_stage(self, step: _Step, row: int, visual, layout, positions: torch.Tensor) -> None:
        """Stage 0 of one prefill request, as the transformers engine builds it for a batch of one."""
        pool, everything = (visual & ~layout)[None], torch.ones(1, visual.numel(), dtype=torch.bool)
        groups = stages.ranking_groups(pool)
        query = stages.query_rows(
            everything,
            visual[None],
            prompt_length=step.requests.prompt_lengths[row],
            instruction_mean=self.config.query == "instruction_mean",
        )
        step.layouts[row] = stages.first_stage(everything, positions.cpu()[..., None, :], pool, groups, query)
        step.groups[row] = groups

    def _check_slots(self, shared, query_lens: list[int], computed: list[int], actual: int) -> None:
        """Once: the slot formula of pyramiddrop.serving.vllm.metadata reproduces vLLM's own slot mapping."""
        if self._slots_checked:
            return
        expected = slot_mapping(StageLayout(query_lens, computed), shared.block_table, self.block_size)
        if not torch.equal(expected.cpu(), shared.slot_mapping[:actual].cpu().long()):
            raise RuntimeError(
                "PyramidDrop: vLLM's slot mapping does not follow block_table[pos // block_size] * block_size + "
                f"pos % block_size with block_size={self.block_size}; this vLLM version is not supported."
            )
        self._slots_checked = True

    # -- a stage boundary ---------------------------------------------------------------------------------------
    def _drop(self, stage: int, ranking: tuple, step: _Step, hidden, residual, positions, rows: _Rows):
        """Rank and gather at a boundary; `ranking` is (layer, its hidden, residual, positions): the stage's first
        layer and what enters it (pdrop), or the layer before and its input (FastV), row for row alike."""
        rank_layer, rank_hidden, rank_residual, rank_positions = ranking
        keep = rows.request >= 0  # padding rows end here
        positions = positions.clone()
        counts = torch.bincount(rows.request[keep], minlength=len(step.drops)).tolist()
        start = 0
        for row, count in enumerate(counts):
            span = slice(start, start + count)
            start += count
            removed = step.drops[row].removed
            if not step.prefill[row]:  # decode: its prefill fixed what each stage lacks
                if self.config.position_mode == "compact":
                    positions[..., span] -= removed[stage] - removed[stage - 1]
                continue
            removed[stage] = removed[stage - 1]
            if row not in step.layouts:  # no visual tokens
                continue
            previous, groups = step.layouts[row], step.groups[row]
            quota = stages.keep_counts(previous, groups, self.config.keep_ratio(stage))
            if stages.drops_nothing(previous, groups, quota):
                continue
            query = previous.query_mask[0].nonzero().squeeze(1)
            part = None if rank_residual is None else rank_residual[span]
            scores = pdrop_scores(
                rank_layer, rank_hidden[span], part, rank_positions[..., span], query.to(hidden.device)
            )
            selected = stages.select(previous, scores.cpu()[None], quota)
            layout, index = stages.drop_stage(previous, selected, self.config.position_mode)
            step.layouts[row] = layout
            removed[stage] = int(layout.dropped[0])
            kept = torch.zeros(count, dtype=torch.bool).index_fill_(0, index[0], True)
            keep[span] = kept
            columns = torch.arange(span.start, span.stop)[kept].to(positions.device)
            positions[..., columns] = layout.positions[..., 0, :].to(positions.device)
        index = keep.nonzero().squeeze(1)
        device_index = index.to(hidden.device)
        residual = None if residual is None else residual[device_index]
        return hidden[device_index], residual, positions[..., device_index], rows.select(index)

    def _install(self, context, names: list[str], stage: int, step: _Step, rows: _Rows, shared, layer) -> None:
        """The stage's metadata and slots, for every attention layer of the stage."""
        counts = torch.bincount(rows.request, minlength=len(step.drops)).tolist()
        computed = [done - drops.removed[stage] if done else 0 for done, drops in zip(step.computed, step.drops)]
        layout = StageLayout(counts, computed)
        slots = slot_mapping(layout, shared.block_table, self.block_size)
        metadata = stage_metadata(shared, layout, slots, layer.self_attn.attn, self.dtype)
        end = self.boundaries[stage] if stage < len(self.boundaries) else len(names)
        for name in names[self.boundaries[stage - 1] : end]:
            context.attn_metadata[name] = metadata
            context.slot_mapping[name] = slots
