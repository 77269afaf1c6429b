"""A stage's attention metadata: its own query start locations, sequence lengths and slot mapping, built from the
step's shared metadata; only `BACKENDS` knows a backend's metadata class.

Each decoder layer has its own KV tensor, indexed through the request's block table (shared by all layers), so a
stage's layers write their kept tokens compactly: token `c` of a request in stage coordinates goes to slot
`block_table[c // block_size] * block_size + c % block_size`, exactly as vLLM maps token `c` of the full sequence.
The slots past a request's kept tokens stay unused (every layer is allocated blocks for the full sequence).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch


@dataclasses.dataclass
class StageLayout:
    """One stage's per-request counts for this step (CPU ints)."""

    query_lens: list[int]  # tokens of each request this step, in stage coordinates
    computed: list[int]  # tokens of each request already in the stage's cache


def slot_mapping(layout: StageLayout, block_table: torch.Tensor, block_size: int) -> torch.Tensor:
    """The stage's slot for every token of the step, requests in batch order."""
    rows, offsets = [], []
    for row, (count, computed) in enumerate(zip(layout.query_lens, layout.computed)):
        rows.append(torch.full((count,), row, dtype=torch.long))
        offsets.append(torch.arange(computed, computed + count, dtype=torch.long))
    row, offset = torch.cat(rows), torch.cat(offsets)
    blocks = block_table.cpu()[row, offset // block_size].long()
    return (blocks * block_size + offset % block_size).to(block_table.device)


def stage_metadata(metadata, layout: StageLayout, slots: torch.Tensor, layer, dtype: torch.dtype):
    """The step's metadata with the stage's lengths and slots; `layer` is an attention layer of the stage,
    `dtype` the model's."""
    build = BACKENDS.get(type(metadata).__name__)
    if build is None:
        raise NotImplementedError(
            f"PyramidDrop builds per-stage attention metadata for {sorted(BACKENDS)}, not {type(metadata).__name__}; "
            "serve with one of those attention backends."
        )
    device = metadata.seq_lens.device
    query_lens = torch.tensor(layout.query_lens, dtype=torch.int32)
    seq_lens = query_lens + torch.tensor(layout.computed, dtype=torch.int32)
    query_start = torch.zeros(len(layout.query_lens) + 1, dtype=torch.int32)
    torch.cumsum(query_lens, 0, out=query_start[1:])
    return build(
        metadata,
        layer,
        dtype,
        num_actual_tokens=int(query_start[-1]),
        max_query_len=int(query_lens.max()),
        query_start_loc=query_start.to(device, metadata.query_start_loc.dtype),
        max_seq_len=int(seq_lens.max()),
        seq_lens=seq_lens.to(device, metadata.seq_lens.dtype),
        slot_mapping=slots.to(metadata.slot_mapping.dtype),
    )


def _cpu_attention(metadata, layer, dtype: torch.dtype, **lengths):
    """vLLM's CPU backend: its scheduler metadata splits the work by sequence lengths, so it is rebuilt."""
    from vllm import _custom_ops as ops
    from vllm import envs

    impl = layer.impl
    scheduler = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=lengths["seq_lens"].numel(),
        num_heads=impl.num_heads,
        num_kv_heads=impl.num_kv_heads,
        head_dim=impl.head_size,
        seq_lens=lengths["seq_lens"],
        dtype=dtype,
        query_start_loc=lengths["query_start_loc"],
        causal=metadata.causal,
        sliding_window_size=impl.sliding_window,
        isa=layer.isa,
        enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV,
        dynamic_causal=metadata.dynamic_causal,
        kv_cache_dtype=impl.kv_cache_dtype,
    )
    return dataclasses.replace(metadata, scheduler_metadata=scheduler, **lengths)


BACKENDS: dict[str, Callable] = {"CPUAttentionMetadata": _cpu_attention}
