"""Selection methods behind the engine and schedules at matched budgets."""

import pytest
import torch
from tiny_models import llava_batch, tiny_llava

from pyramiddrop import PyramidDropConfig, apply_pyramid_drop, get_drop_record
from pyramiddrop.budget import average_visual_fraction, budget_from_flops_fraction, fastv_schedule, pyramid_schedule
from pyramiddrop.flops import paper_flops
from pyramiddrop.scoring.spatial import _dither_rank

PROMPTS = [(3, 1, 6), (1, 1, 2), (5, 2, 4)]


@pytest.mark.parametrize("budget", [1 / 2, 1 / 3, 2 / 9, 1 / 9])
@pytest.mark.parametrize("num_layers, num_visual", [(32, 576), (32, 2880), (24, 576)])
def test_schedules_meet_the_budget_within_two_percent(budget, num_layers, num_visual):
    for config in (pyramid_schedule(budget, num_layers, num_visual), fastv_schedule(budget, num_layers, num_visual)):
        assert average_visual_fraction(config, num_layers, num_visual) == pytest.approx(budget, rel=0.02)
    fastv = fastv_schedule(budget, num_layers, num_visual)
    assert len(fastv.layer_list) == 1 and fastv.position_mode == "original"


def test_flops_budget_hits_its_flops_fraction():
    budget = budget_from_flops_fraction(0.45, 32, 4096, 11008, 2880)
    config = pyramid_schedule(budget, 32, 2880)
    fraction = paper_flops(32, 4096, 11008, 2880, config) / paper_flops(32, 4096, 11008, 2880)
    assert fraction == pytest.approx(0.45, rel=0.02)


def test_unreachable_budget_says_why():
    with pytest.raises(ValueError, match="cannot reach an average of 0.111 of 144 visual tokens over 8 layers"):
        pyramid_schedule(1 / 9, 8, 144)
    with pytest.raises(ValueError, match=r"budget must be a fraction in \(0, 1\)"):
        pyramid_schedule(1.5, 8, 144)


def run(config, batch=None):
    model = apply_pyramid_drop(tiny_llava(kv_heads=2), config)
    with torch.no_grad():
        model(**(batch or llava_batch(PROMPTS)))
    return get_drop_record(model)


@pytest.mark.parametrize("method", ["pdrop", "random", "uniform", "pivot-duplication"])
def test_every_method_keeps_the_scheduled_counts(method):
    record = run(PyramidDropConfig(layer_list=[2, 4], image_token_ratio_list=[0.5, 0.25], method=method))
    for row, visual in enumerate(record.num_visual_tokens):
        assert [len(kept) for kept in record.kept_visual_indices[row]] == [
            visual,
            int(visual * 0.5),
            int(visual * 0.25),
        ]


def test_random_is_reproducible_by_seed():
    config = PyramidDropConfig(layer_list=[2], image_token_ratio_list=[0.5], method="random", seed=3)
    first, again = run(config).kept_visual_indices, run(config).kept_visual_indices
    other = run(
        PyramidDropConfig(layer_list=[2], image_token_ratio_list=[0.5], method="random", seed=4)
    ).kept_visual_indices
    assert all(torch.equal(a[1], b[1]) for a, b in zip(first, again))
    assert not all(torch.equal(a[1], b[1]) for a, b in zip(first, other))


def test_uniform_keeps_an_evenly_spread_grid():
    # 64 tokens = an 8x8 patch grid; keeping a quarter gives every other row and column.
    kept = run(PyramidDropConfig(layer_list=[2], image_token_ratio_list=[0.25], method="uniform")).kept_visual_indices[
        0
    ][1]
    rows, cols = kept // 8, kept % 8
    assert sorted(set(rows.tolist())) == [0, 2, 4, 6] and sorted(set(cols.tolist())) == [0, 2, 4, 6]
    assert sorted(_dither_rank(4).tolist()) == list(range(16))


def test_fastv_keeps_original_positions():
    """With original positions, a token's rotary position does not depend on what was dropped before it."""
    config = fastv_schedule(0.5, 6, 64)
    model = apply_pyramid_drop(tiny_llava(kv_heads=2), config)
    seen = {}
    layer = model.model.language_model.layers[config.layer_list[0]]
    handle = layer.register_forward_pre_hook(
        lambda m, a, k: seen.update(cos=k["position_embeddings"][0]), with_kwargs=True
    )
    batch = llava_batch(PROMPTS[:1])
    with torch.no_grad():
        model(**batch)
    handle.remove()
    record = get_drop_record(model)
    expected = model.model.language_model.rotary_emb(seen["cos"], record.kept_positions)[0]
    assert torch.allclose(seen["cos"], expected)
