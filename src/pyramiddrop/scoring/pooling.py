"""`pool`: average pooling of the patch grid, the downsampling baseline (VTC-Bench), as a merge.

Each image's visual tokens (a run of consecutive ones) are read as a square grid in row-major order. A drop keeping `K` of `S x S` tokens averages `kh x kw` blocks with `(S / kh) *
(S / kw) = K` (the squarest such kernel, taller when it cannot be square: 2x2 keeps 1/4, 3x1 keeps 1/3, 3x3
keeps 1/9). The merged token sits where its block's top-left patch was: it takes that token's slot and
position (original or compact renumbering alike), and its hidden state becomes the block's mean, with the
gradient flowing to all of the block's tokens.
"""

from __future__ import annotations

import math

import torch

from pyramiddrop.scoring import RankInputs, register_scorer


def _check(config) -> None:
    if len(config.layer_list) != 1:
        raise ValueError(
            f"method 'pool' averages patch blocks of the full grid, which an earlier drop breaks: give one drop "
            f"(e.g. layer_list=[0], image_token_ratio_list=[0.25]), got layer_list={config.layer_list}."
        )


def pool_kernel(side: int, area: int) -> tuple[int, int] | None:
    """(kh, kw) with kh * kw == area, both dividing `side`, the squarest first (taller on a tie)."""
    shapes = [(h, area // h) for h in range(1, area + 1) if area % h == 0 and side % h == 0 and side % (area // h) == 0]
    return min(shapes, key=lambda shape: (abs(shape[0] - shape[1]), -shape[0])) if shapes else None


def _blocks(inputs: RankInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Each visual token's block id (unique in the batch, -1 outside) and whether it is its block's anchor.

    A run of consecutive visual tokens is one image's patch grid (LLaVA places each image's tokens together);
    a group may hold several, all pooled with the same kernel.
    """
    block = torch.full_like(inputs.group_index, -1)
    anchor = torch.zeros_like(inputs.group_index, dtype=torch.bool)
    sequence = torch.arange(block.shape[1], device=block.device).expand_as(block)
    offset = 0
    for group, keep in enumerate(inputs.keep.tolist()):
        members = inputs.group_index == group
        where = sequence[members]  # ascending: a group lies in one row
        count = where.numel()
        starts = torch.ones_like(where, dtype=torch.bool)
        starts[1:] = where[1:] != where[:-1] + 1
        run_of = starts.long().cumsum(0) - 1
        area = count // keep if keep > 0 and count % keep == 0 else 0
        group_block, group_anchor = torch.empty_like(where), torch.empty_like(starts)
        for run in range(int(run_of.max()) + 1 if count else 0):
            in_run = run_of == run
            length = int(in_run.sum())
            side = math.isqrt(length)
            kernel = pool_kernel(side, area) if side * side == length and area else None
            if kernel is None:
                raise ValueError(
                    f"method 'pool' averages k x k blocks of each image's square patch grid: keeping {keep} of "
                    f"{count} visual tokens, an image of {length} tokens has no such pooling. Use a keep ratio of "
                    "1/(kh*kw) whose kernel divides the grid side (0.25 for 2x2, 1/9 for 3x3) and square grids."
                )
            kh, kw = kernel
            index = torch.arange(length, device=block.device)
            row, column = index // side, index % side
            group_block[in_run] = offset + (row // kh) * (side // kw) + column // kw
            group_anchor[in_run] = (row % kh == 0) & (column % kw == 0)
            offset += length // area
        block[members], anchor[members] = group_block, group_anchor
    return block, anchor


def pool_merge(inputs: RankInputs, selected: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """The anchors' hidden states become their blocks' means; every other token is unchanged."""
    block, anchor = _blocks(inputs)
    inside = block >= 0
    num_blocks = int(block.max()) + 1 if bool(inside.any()) else 0
    sums = hidden.new_zeros(num_blocks, hidden.shape[-1]).index_add(0, block[inside], hidden[inside])
    counts = torch.bincount(block[inside], minlength=num_blocks).clamp(min=1).to(hidden.dtype)
    means = sums / counts[:, None]
    merged = hidden.clone()
    merged[anchor] = means[block[anchor]]
    return merged


@register_scorer("pool", check=_check, merge=pool_merge, per_frame=True)
def pool_scores(inputs: RankInputs) -> torch.Tensor:
    """Block anchors first: the engine keeps exactly them, and `pool_merge` fills them with the block means."""
    _, anchor = _blocks(inputs)
    return anchor.float()
