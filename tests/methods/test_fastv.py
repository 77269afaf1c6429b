"""`method="fastv"` is FastV as released (pkunlp-icler/FastV): the oracle below transcribes its selection plainly.

Released FastV, K = `fastv_k`: layer K-1 runs with `output_attentions=True`; its map is averaged over heads, the
last token's row read at the image columns, `topk(ATTENTION_RANK)` taken, and the kept tokens (sorted, with all
text) continue from layer K at their original positions. One sample per call (its scripts run batch 1).
"""

import pytest
import torch
from tiny_models import IMAGE_TOKEN_ID, llava_batch, sample, tiny_llava

from pyramiddrop import PyramidDropConfig, apply_pyramid_drop, get_drop_record, remove_pyramid_drop


def released_fastv_selection(model, single: dict, k: int, keep: int) -> torch.Tensor:
    """FastV's selection on one unpadded sample, from the eager attention map of layer K-1 (no drop)."""
    with torch.no_grad():
        out = model(**single, output_attentions=True)
    attention = out.attentions[k - 1][0].mean(dim=0)  # [query, key], mean over heads
    last_row = attention[-1]
    image_columns = (single["input_ids"][0] == IMAGE_TOKEN_ID).nonzero().flatten()
    top = last_row[image_columns].topk(keep).indices
    return top.sort().values


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("k,keep_ratio", [(1, 0.5), (2, 0.25), (4, 0.125)])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_fastv_keeps_what_released_fastv_keeps(seed, k, keep_ratio, attn):
    eager = tiny_llava("eager", kv_heads=2, seed=seed)
    batch = llava_batch([(3, 1, 6), (1, 2, 2), (5, 1, 4)], seed=seed)
    config = PyramidDropConfig.fastv(k, keep_ratio)
    model = apply_pyramid_drop(tiny_llava(attn, kv_heads=2, seed=seed), config)
    with torch.no_grad():
        model(**batch)  # a padded batch: each row must keep what FastV keeps for it alone
    record = get_drop_record(model)
    for row in range(3):
        single = sample(batch, row)
        num_visual = int((single["input_ids"] == IMAGE_TOKEN_ID).sum())
        expected = released_fastv_selection(eager, single, k, int(num_visual * keep_ratio))
        assert record.kept_visual_indices[row][1].tolist() == expected.tolist()


def test_fastv_scores_equal_the_eager_attention_row_of_the_layer_before():
    """The recomputed row (query against the keys of layer K-1's input) equals the map eager attention returns."""
    from pyramiddrop.scoring import SCORERS

    captured = {}
    original = SCORERS["fastv"]

    def spy(inputs):
        captured["scores"] = original(inputs)
        captured["visual"] = inputs.visual_index
        return captured["scores"]

    SCORERS["fastv"] = spy
    try:
        model = apply_pyramid_drop(tiny_llava("sdpa", kv_heads=2), PyramidDropConfig.fastv(3, 0.5))
        single = sample(llava_batch([(2, 1, 3)]), 0)
        with torch.no_grad():
            model(**single)
    finally:
        SCORERS["fastv"] = original
    remove_pyramid_drop(model)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        attention = model(**single, output_attentions=True).attentions[2][0].mean(dim=0)[-1]
    visual = captured["visual"][0] >= 0
    torch.testing.assert_close(captured["scores"][0][visual], attention[visual], rtol=1e-5, atol=1e-6)


def test_fastv_differs_from_pyramiddrop_with_one_drop():
    """The old `fastv` rows (PyramidDrop's rule, layer K's attention) keep another set on these models."""
    batch = llava_batch([(3, 1, 6), (1, 1, 2), (5, 1, 4)])
    kept = {}
    for name, config in {
        "fastv": PyramidDropConfig.fastv(2, 0.25),
        "pdrop": PyramidDropConfig([2], [0.25], position_mode="original"),
    }.items():
        model = apply_pyramid_drop(tiny_llava("sdpa", kv_heads=2), config)
        with torch.no_grad():
            model(**batch)
        kept[name] = [record[1] for record in get_drop_record(model).kept_visual_indices]
    assert any(not torch.equal(a, b) for a, b in zip(kept["fastv"], kept["pdrop"]))


@pytest.mark.parametrize(
    "fields,message",
    [
        (dict(layer_list=[2, 4], image_token_ratio_list=[0.5, 0.25]), "one drop before layer K >= 1"),
        (dict(layer_list=[0], image_token_ratio_list=[0.5]), "one drop before layer K >= 1"),
        (dict(layer_list=[2], image_token_ratio_list=[0.5]), "position_mode='original'"),
        (
            dict(layer_list=[2], image_token_ratio_list=[0.5], position_mode="original", conversation="rerank"),
            "conversation='keep'",
        ),
    ],
)
def test_fastv_refuses_what_is_not_fastv(fields, message):
    with pytest.raises(ValueError, match=message):
        PyramidDropConfig(method="fastv", **fields)
