"""A sample's result depends on the sample alone: every method's batched `generate()` equals each row alone (mixed
token counts, text-only rows, left padding as generate() expects), and stochastic methods draw the same tokens when called
again, in another batch, or at another row (issue: `random` drew one `torch.rand(batch, max N)` per call)."""

import pytest
import torch
from generation_checks import assert_rows_equal_alone, greedy
from tiny_models import llava_batch, sample, tiny_llava

from pyramiddrop import PyramidDropConfig, apply_pyramid_drop, get_drop_record

STEPS = 4
TOLERANCE = 1e-4
CONFIGS = {
    "pdrop": PyramidDropConfig([2, 4], [0.5, 0.25]),
    "fastv": PyramidDropConfig.fastv(2, 0.3),
    "random": PyramidDropConfig([2, 4], [0.5, 0.25], method="random", seed=3),
    "random@0": PyramidDropConfig([0, 3], [0.5, 0.2], method="random"),
    "uniform": PyramidDropConfig([2, 4], [0.5, 0.25], method="uniform"),
    "pivot-duplication": PyramidDropConfig([2], [0.3], method="pivot-duplication"),
    "divprune@0": PyramidDropConfig([0], [0.3], method="divprune"),
    "visionzip@0": PyramidDropConfig([0], [0.3], method="visionzip"),
    # vispruner selects within one image (its release): tests/methods/test_vispruner.py has its one-image batch.
    "conditional-dpp@0": PyramidDropConfig([0], [0.3], method="conditional-dpp", query="instruction_mean"),
    "pool@0": PyramidDropConfig([0], [0.25], method="pool"),
    # images keep every token (its padded video batches: tests/methods/test_dycoke.py)
    "dycoke-ttm@0": PyramidDropConfig.dycoke_ttm(0.7),
    "pdrop-original": PyramidDropConfig([1, 3], [0.4, 0.1], position_mode="original"),
}


def _prompts(seed: int) -> list[tuple[int, int, int]]:
    """Four samples of random lengths with 0 to 2 images each (so different visual-token counts), one text-only."""
    generator = torch.Generator().manual_seed(seed)
    prompts = [tuple(int(v) for v in torch.randint(1, 6, (3,), generator=generator)) for _ in range(4)]
    prompts = [(prefix, images % 3, suffix) for prefix, images, suffix in prompts]
    prompts[int(torch.randint(0, 4, (1,), generator=generator))] = (3, 0, 2)
    if all(images == 0 for _, images, _ in prompts):
        prompts[0] = (2, 1, 3)
    return prompts


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("seed", range(3))
def test_batch_equals_each_row_alone(name, seed):
    model = apply_pyramid_drop(tiny_llava("sdpa", text_only_output=True), CONFIGS[name])
    batch = llava_batch(_prompts(seed), seed=seed)
    samples = [sample(batch, row) for row in range(batch["input_ids"].shape[0])]
    assert_rows_equal_alone(model, batch, samples, STEPS, TOLERANCE)


def test_random_selection_is_the_same_when_called_again_and_in_another_batch():
    model = apply_pyramid_drop(tiny_llava("sdpa", text_only_output=True), CONFIGS["random"])
    batch = llava_batch([(2, 1, 3), (4, 2, 1), (1, 1, 5)])
    first = greedy(model, batch, STEPS)
    kept_first = get_drop_record(model).kept_visual_indices
    again = greedy(model, batch, STEPS)  # the same engine, no re-apply: the same draws
    assert torch.equal(first.sequences, again.sequences)
    assert all(
        torch.equal(a, b) for x, y in zip(kept_first, get_drop_record(model).kept_visual_indices) for a, b in zip(x, y)
    )
    # Row order reversed: each sample keeps what it kept at its old row.
    reversed_batch = {
        "input_ids": batch["input_ids"].flip(0),  # left padding stays on the left
        "attention_mask": batch["attention_mask"].flip(0),
        "pixel_values": batch["pixel_values"][[3, 1, 2, 0]],  # rows' images: [0], [1, 2], [3]
    }
    greedy(model, reversed_batch, STEPS)
    kept_reversed = get_drop_record(model).kept_visual_indices
    for row in range(3):
        assert all(torch.equal(a, b) for a, b in zip(kept_first[row], kept_reversed[2 - row]))


def test_random_selection_changes_with_the_seed_and_the_sample():
    batch = llava_batch([(2, 1, 3), (2, 1, 4)])
    kept = {}
    for seed in (0, 1):
        config = PyramidDropConfig([2], [0.25], method="random", seed=seed)
        model = apply_pyramid_drop(tiny_llava("sdpa", text_only_output=True), config)
        greedy(model, batch, 1)
        kept[seed] = [get_drop_record(model).kept_visual_indices[row][1] for row in range(2)]
    assert not torch.equal(kept[0][0], kept[1][0])  # another seed, another draw
    assert not torch.equal(kept[0][0], kept[0][1])  # another prompt, another draw
