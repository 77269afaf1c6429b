"""`random` and `uniform`: selections that look at no feature, the baselines every method must beat."""

from __future__ import annotations

import torch

from pyramiddrop.scoring import RankInputs, register_scorer


@register_scorer("random", stochastic=True)
def random_scores(inputs: RankInputs) -> torch.Tensor:
    """Random pruning, reproducible through `PyramidDropConfig.seed`.

    Each sample draws from its own generator (`RankInputs.sample_seeds`, mixed with the stage), one number per
    visual token by its index in the sample's pool, not per sequence slot: the same tokens win alone or in a
    batch, and whatever text follows the image (assisted decoding's candidates, a longer prompt).
    """
    index = inputs.visual_index
    seeds = inputs.sample_seeds
    if seeds is None:
        seeds = torch.zeros(index.shape[0], dtype=torch.long)
    rows = []
    for row in range(index.shape[0]):
        generator = torch.Generator().manual_seed((int(seeds[row]) + 1_000_003 * inputs.stage) % 2**63)
        rows.append(torch.rand(max(1, int(index[row].max()) + 1), generator=generator))
    draws = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)
    return draws.to(index.device).gather(1, index.clamp(min=0))


def _dither_rank(size: int) -> torch.Tensor:
    """Bayer ordered-dither ranks of a `size`x`size` grid: every prefix of the order is spread evenly."""
    order = torch.zeros(1, 1, dtype=torch.long)
    while order.shape[0] < size:
        order = torch.cat([torch.cat([4 * order, 4 * order + 2], 1), torch.cat([4 * order + 3, 4 * order + 1], 1)], 0)
    return order[:size, :size].flatten().argsort().argsort()  # dense ranks of the cropped grid


def _van_der_corput_rank(count: int) -> torch.Tensor:
    bits = max(count - 1, 1).bit_length()
    reversed_index = torch.tensor([int(f"{index:0{bits}b}"[::-1], 2) for index in range(count)])
    return reversed_index.argsort().argsort()


@register_scorer("uniform")
def uniform_scores(inputs: RankInputs) -> torch.Tensor:
    """Spatially uniform subsampling: an evenly spread subset of each sample's visual tokens.

    A square token count is read as a patch grid (ordered-dither order); any other count as a sequence
    (bit-reversed order). Either way the kept set of any size covers the image evenly.
    """
    scores = torch.zeros(inputs.visual_index.shape, dtype=torch.float32)
    for row, visual_index in enumerate(inputs.visual_index.cpu()):
        count = int(visual_index.max()) + 1
        if count <= 0:
            continue
        side = int(round(count**0.5))
        rank = _dither_rank(side) if side * side == count else _van_der_corput_rank(count)
        present = visual_index >= 0
        scores[row, present] = (count - rank[visual_index[present]]).float()
    return scores.to(inputs.visual_index.device)
