"""`method="dart"` is DART as released (ZichenWen1/DART): the oracle below transcribes its selection plainly.

Transcribed: `DART.get_retained_image_token` and the lines of `DART.forward` that feed it, from
`llava/model/language_model/modeling_llama_self.py` at the authors' last commit 5a19452f (2025-08-31; read from the
fork xqy1111111/DART, whose history holds it). At layer K the release takes layer K-1's output through the final
norm (`last_layer_state`) and layer K-1's key states after RoPE (`any_states`, after `repeat_kv`), on one sample.
"""

import math

import pytest
import torch
from generation_checks import (
    assert_generate_equals_ranked_recompute,
    assert_rows_equal_alone,
    generate_positions,
)
from tiny_models import (
    IMAGE_TOKEN_ID,
    collate,
    llava_batch,
    qwen_sample,
    sample,
    tiny_llava,
    tiny_llava_next,
    tiny_qwen2_vl,
)

from pyramiddrop import PyramidDropConfig, apply_pyramid_drop, get_drop_record

PROMPTS = [(3, 1, 6), (1, 1, 4), (5, 1, 3)]  # one image each, at least 4 text tokens after it


def released_dart(model, single: dict, k: int, max_num_trunction: int) -> tuple[set, list]:
    """The release's retained image tokens on one unpadded sample (eager model, no drop), and the order in which it
    adds them (image pivots, then each pivot's picks): the one line not in the release is `added`."""
    pivot_image_token, pivot_text_token = 4, 4
    with torch.no_grad():
        out = model(**single, output_hidden_states=True, use_cache=True)
        last_layer_state = model.model.language_model.norm(out.hidden_states[k])  # self.norm(layer_outputs[0])
    key_states = out.past_key_values.layers[k - 1].keys  # [1, kv_heads, L, head_dim], after RoPE
    groups = model.config.text_config.num_attention_heads // key_states.shape[1]
    any_states = key_states.repeat_interleave(groups, dim=1)  # repeat_kv
    image = (single["input_ids"][0] == IMAGE_TOKEN_ID).nonzero().flatten()
    image_token_start_index, image_token_length = int(image[0]), len(image)

    TOKEN_TOPK = math.ceil(max_num_trunction // (pivot_image_token + pivot_text_token))  # noqa: N806 (the release's)
    device = last_layer_state.device
    any_states = any_states.permute(0, 2, 1, 3).reshape(any_states.shape[0], any_states.shape[2], -1)
    k_states_image_token = any_states[0][image_token_start_index : image_token_start_index + image_token_length, :]
    k_states_query_token = any_states[0][image_token_start_index + image_token_length :, :]
    k_states_image_token_L1_norm = torch.norm(k_states_image_token, p=1, dim=-1)  # noqa: N806
    k_states_query_token_L1_norm = torch.norm(k_states_query_token, p=1, dim=-1)  # noqa: N806
    image_indices = (k_states_image_token_L1_norm.topk(pivot_image_token).indices + image_token_start_index).tolist()
    query_indices = (
        k_states_query_token_L1_norm.topk(pivot_text_token).indices + image_token_start_index + image_token_length
    ).tolist()
    indices_set = set(image_indices + query_indices)
    valid_indices = set(range(image_token_start_index, image_token_start_index + image_token_length)) - set(
        image_indices
    )
    added = list(image_indices)
    valid_indices_list = list(valid_indices)
    for item in list(indices_set):
        valid_vectors = last_layer_state[0][valid_indices_list, :]
        cos_sim = -torch.nn.functional.cosine_similarity(last_layer_state[0][item, :], valid_vectors, dim=-1)
        top_k_indices = cos_sim.topk(TOKEN_TOPK).indices
        top_k_real_indices = [valid_indices_list[i] for i in top_k_indices]
        indices_set.update(top_k_real_indices)
        added += top_k_real_indices
        valid_indices.difference_update(top_k_real_indices)
        valid_indices_list = list(valid_indices)
    indices_set.difference_update(query_indices)
    retained_image_tokens_index = torch.tensor(list(indices_set), device=device)
    return {int(i) - image_token_start_index for i in retained_image_tokens_index}, [
        i - image_token_start_index for i in added
    ]


def random_norms(model, seed: int = 0):
    """RMSNorm weights made random too (all ones would make the final norm a mere rescaling, which cosine
    similarity cannot see)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() == 1 and "norm" in name and "vision" not in name:
                parameter.copy_(1 + 0.5 * torch.randn(parameter.shape, generator=generator))
    return model


def tiny(attn: str = "sdpa", seed: int = 0, **kwargs):
    return random_norms(tiny_llava(attn, kv_heads=2, seed=seed, **kwargs), seed)


def dart(k: int, kept: int, num_visual: int = 64) -> PyramidDropConfig:
    """DART at layer K keeping exactly `kept` of `num_visual` tokens (`int(N * ratio)` with a safe ratio)."""
    ratio = (kept + 0.5) / num_visual
    return PyramidDropConfig([k], [ratio], method="dart", position_mode="original")


def run_batch(attn: str, seed: int, config: PyramidDropConfig, padding: str = "left"):
    """A padded batch in one forward, with the positions generate() gives it (keys after RoPE depend on them)."""
    batch = llava_batch(PROMPTS, seed=seed, padding=padding)
    model = apply_pyramid_drop(tiny(attn, seed), config)
    with torch.no_grad():
        model(**batch, position_ids=generate_positions(batch["attention_mask"]))
    return batch, [kept[1] for kept in get_drop_record(model).kept_visual_indices]


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("k,topk", [(1, 1), (2, 3), (2, 7), (3, 2)])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_dart_keeps_what_released_dart_keeps(seed, k, topk, attn):
    """At `keep = 4 + 8 * TOKEN_TOPK` every row of a padded batch keeps exactly the release's set for it alone."""
    batch, kept = run_batch(attn, seed, dart(k, 4 + 8 * topk), padding="left" if seed % 2 else "right")
    eager = tiny("eager", seed)
    for row in range(len(PROMPTS)):
        expected, _ = released_dart(eager, sample(batch, row), k, max_num_trunction=8 * topk)
        assert len(expected) == 4 + 8 * topk
        assert set(kept[row].tolist()) == expected


@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize("kept_count", [2, 7, 16, 33])
def test_other_counts_keep_the_first_tokens_the_release_adds(seed, kept_count):
    """The engine's count (the one deviation): with `TOKEN_TOPK = ceil((keep - 4) / 8)` the first `keep` tokens the
    release adds, image pivots by norm first, then each pivot's picks, least similar first."""
    batch, kept = run_batch("sdpa", seed, dart(2, kept_count))
    eager = tiny("eager", seed)
    topk = max(0, math.ceil((kept_count - 4) / 8))
    for row in range(len(PROMPTS)):
        _, added = released_dart(eager, sample(batch, row), 2, max_num_trunction=8 * topk)
        assert kept[row].tolist() == sorted(added[:kept_count])


@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_qwen2_vl_keeps_what_released_dart_keeps(seed, attn):
    """M-RoPE keys (the release has a Qwen2-VL port with the same selection): images of 16, 24 and 32 tokens keep
    12 (= 4 + 8, the release's set), 18 and 24 (its first tokens) in a padded batch."""
    grids = [(8, 8), (12, 8), (8, 16)]
    samples = [qwen_sample([3 + i, ("image", *grid), 6 - i], seed=seed + i) for i, grid in enumerate(grids)]
    config = PyramidDropConfig([2], [0.78], method="dart", position_mode="original")
    model = apply_pyramid_drop(random_norms(tiny_qwen2_vl(attn, seed=seed), seed), config)
    with torch.no_grad():
        model(**collate(samples))
    kept = [k[1] for k in get_drop_record(model).kept_visual_indices]
    eager = random_norms(tiny_qwen2_vl("eager", seed=seed), seed)
    for row, single in enumerate(samples):
        count = int(len(kept[row]))
        assert count == int(int((single["input_ids"] == IMAGE_TOKEN_ID).sum()) * 0.78)
        _, added = released_dart(eager, single, 2, max_num_trunction=8 * math.ceil((count - 4) / 8))
        assert kept[row].tolist() == sorted(added[:count])


def test_dart_differs_from_pivot_duplication():
    """The old `dart` rows (now `pivot-duplication`) keep another set on these models."""
    _, real = run_batch("sdpa", 0, dart(2, 28))
    old = PyramidDropConfig([2], [28.5 / 64], method="pivot-duplication", position_mode="original")
    _, duplication = run_batch("sdpa", 0, old)
    assert any(not torch.equal(a, b) for a, b in zip(real, duplication))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_padded_generate_equals_each_row_alone(attn):
    """generate() on a padded batch with a text-only row: each row's tokens, logits and kept set as alone."""
    batch = llava_batch([(3, 1, 6), (3, 0, 2), (1, 1, 4), (5, 1, 3)], seed=1)
    model = apply_pyramid_drop(tiny(attn, text_only_output=True), dart(2, 20))
    assert_rows_equal_alone(model, batch, [sample(batch, row) for row in range(4)], steps=4, tol=1e-4)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_generate_equals_a_full_recompute(attn):
    """Cached decoding equals one forward over prompt + generated tokens, ranked with the prompt alone."""
    batch = llava_batch(PROMPTS, seed=2)
    model = apply_pyramid_drop(tiny(attn, text_only_output=True), dart(2, 13))
    assert_generate_equals_ranked_recompute(model, batch, steps=6, tol=1e-4)


def test_dart_keeps_the_engine_count():
    _, kept = run_batch("sdpa", 0, PyramidDropConfig([2], [0.3], method="dart", position_mode="original"))
    assert [len(k) for k in kept] == [int(64 * 0.3)] * 3


@pytest.mark.parametrize(
    "fields,message",
    [
        (dict(layer_list=[2, 4], image_token_ratio_list=[0.5, 0.25]), "one drop before layer K >= 1"),
        (dict(layer_list=[0], image_token_ratio_list=[0.5]), "one drop before layer K >= 1"),
        (dict(layer_list=[2], image_token_ratio_list=[0.5]), "position_mode='original'"),
        (dict(layer_list=[2], image_token_ratio_list=[0.5], conversation="rerank"), "conversation='keep'"),
        (dict(layer_list=[2], image_token_ratio_list=[0.5], video_pool="frame"), "video_pool='sample'"),
        (dict(layer_list=[2], image_token_ratio_list=[0.5], query="instruction_mean"), "leave query='last'"),
    ],
)
def test_dart_refuses_what_the_release_does_not_do(fields, message):
    fields.setdefault("position_mode", "original")
    if message == "position_mode='original'":
        fields["position_mode"] = "compact"
    with pytest.raises(ValueError, match=message):
        PyramidDropConfig(method="dart", **fields)


@pytest.mark.parametrize(
    "prompt,message",
    [
        ((3, 2, 4), r"one image per sample.*sample 0 has 128 droppable visual tokens spread over 130 positions"),
        ((3, 1, 1), r"4 image pivots and 4 text pivots.*sample 0 has 64 visual tokens and 3 text tokens after them"),
    ],
)
def test_dart_refuses_samples_the_release_cannot_rank(prompt, message):
    model = apply_pyramid_drop(tiny(), dart(2, 12))
    with pytest.raises(ValueError, match=message), torch.no_grad():
        model(**llava_batch([prompt]))


def test_dart_refuses_layout_tokens_inside_the_image_block():
    """LLaVA-NeXT's row newlines sit inside the image block; the release would drop them, the engine never does."""
    model = apply_pyramid_drop(
        tiny_llava_next(), PyramidDropConfig([2], [0.3], method="dart", position_mode="original")
    )
    pixel_values, image_sizes = torch.randn(1, 5, 3, 28, 28), torch.tensor([[56, 56]])
    with torch.no_grad():
        count = len(model.model.get_image_features(pixel_values=pixel_values, image_sizes=image_sizes).pooler_output[0])
    ids = torch.tensor([[1, 7, 8] + [IMAGE_TOKEN_ID] * count + [9, 10, 11, 12, 13]])
    batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixel_values, image_sizes=image_sizes)
    message = "layout tokens inside the block such as LLaVA-NeXT's row newlines"
    with pytest.raises(ValueError, match=message), torch.no_grad():
        model(**batch)
