"""Qwen2-VL, Qwen2.5-VL, Qwen3-VL (3-D M-RoPE positions) and LLaVA-OneVision (anyres images, videos) on tiny
random-weight models (float32, CPU): the same properties as the LLaVA tests, plus positions and video pools."""

from dataclasses import replace
from functools import partial

import pytest
import torch
from generation_checks import (
    assert_cached_equals_recompute,
    assert_rows_equal_alone,
    greedy,
    replay_scorer,
)
from tiny_models import (
    IMAGE_TOKEN_ID,
    VIDEO_TOKEN_ID,
    collate,
    onevision_sample,
    qwen_sample,
    qwen_samples,
    tiny_llava_onevision,
    tiny_qwen2_5_vl,
    tiny_qwen2_vl,
    tiny_qwen3_vl,
)
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from pyramiddrop import PyramidDropConfig, apply_pyramid_drop, get_drop_record, remove_pyramid_drop

STEPS = 6
TOL = 3e-5  # float32 logits: cached vs recomputed and batched vs alone differ by rounding only (measured <= 8e-6)
PDROP = PyramidDropConfig(layer_list=[2, 4], image_token_ratio_list=[0.5, 0.25], position_mode="original")
QWEN = {
    "qwen2_vl": tiny_qwen2_vl,
    "qwen2_5_vl": tiny_qwen2_5_vl,
    "qwen3_vl": tiny_qwen3_vl,
    "qwen3_vl_moe": partial(tiny_qwen3_vl, moe=True),
}

_REPLAY = ("replay_for_vlm_tests", replay_scorer("replay_for_vlm_tests"))


def onevision_samples(model) -> list[dict]:
    """A one-crop-grid image, a 4-frame video and a 2x2-grid anyres image (newline tokens end every row)."""
    return [
        onevision_sample(model, 3, ("image", 28, 28), 4, seed=1),
        onevision_sample(model, 2, ("video", 4), 2, seed=2),
        onevision_sample(model, 1, ("image", 56, 50), 5, seed=3),
    ]


def check_cached_decoding(model, batch: dict, config: PyramidDropConfig) -> None:
    assert_cached_equals_recompute(model, batch, config, _REPLAY, STEPS, TOL)


def check_samples_alone(model, samples: list[dict]) -> None:
    assert_rows_equal_alone(model, collate(samples), samples, STEPS, TOL)


def layer_by_layer(model, sample: dict, positions: torch.Tensor, config: PyramidDropConfig) -> torch.Tensor:
    """The dropped forward rebuilt from the unpatched model's own modules, one sample without padding.

    Stage 0 runs unpatched; at each boundary the recorded kept tokens are gathered, and the later layers run on
    them with transformers' own rotary embedding at `positions` (gathered), its own causal / sliding masks.
    """
    apply_pyramid_drop(model, config)
    with torch.no_grad():
        expected = model(**sample).logits
    kept = get_drop_record(model).kept_visual_indices[0]
    remove_pyramid_drop(model)
    language_model = model.model.language_model
    captured = {}

    def capture(module, args, kwargs):
        captured.setdefault("embeds", kwargs["inputs_embeds"])

    def capture_layer(module, args, kwargs):
        captured.setdefault("hidden", args[0] if args else kwargs["hidden_states"])

    handles = [
        language_model.register_forward_pre_hook(capture, with_kwargs=True),
        language_model.layers[config.layer_list[0]].register_forward_pre_hook(capture_layer, with_kwargs=True),
    ]
    with torch.no_grad():
        model(**sample)
    for handle in handles:
        handle.remove()

    visual = torch.isin(sample["input_ids"][0], torch.tensor([IMAGE_TOKEN_ID, VIDEO_TOKEN_ID]))
    newline = getattr(model.model, "image_newline", None)
    if newline is not None:  # LLaVA-OneVision: newline tokens are kept, outside the pool
        visual &= ~(captured["embeds"][0] == newline).all(-1)
    pool_positions = visual.nonzero()[:, 0]
    hidden, source = captured["hidden"], torch.arange(visual.shape[0])
    types = getattr(language_model.config, "layer_types", None) or ["full_attention"] * len(language_model.layers)
    boundaries = [*config.layer_list, len(language_model.layers)]
    with torch.no_grad():
        for stage, (start, end) in enumerate(zip(boundaries, boundaries[1:]), start=1):
            keep = ~visual[source] | torch.isin(source, pool_positions[kept[stage]])
            hidden, source = hidden[:, keep], source[keep]
            if config.position_mode == "compact":
                stage_positions = torch.arange(source.shape[0])[None]
            else:
                stage_positions = positions[..., source]
            embeddings = language_model.rotary_emb(hidden, stage_positions)
            # config, embeds, mask, cache (`past_key_values` before transformers 5.24, `cache` since): by position
            mask_args = (language_model.config, hidden, torch.ones(1, source.shape[0], dtype=torch.bool), None)
            masks = {"full_attention": create_causal_mask(*mask_args)}
            if "sliding_attention" in types:
                masks["sliding_attention"] = create_sliding_window_causal_mask(*mask_args)
            for layer in range(start, end):
                hidden = language_model.layers[layer](
                    hidden, attention_mask=masks[types[layer]], position_embeddings=embeddings
                )
        manual = model.lm_head(language_model.norm(hidden))
    assert manual.shape == expected.shape
    return (manual - expected).abs().max().item()


def rope_positions(model, sample: dict) -> torch.Tensor:
    keys = ["image_grid_thw", "video_grid_thw", "attention_mask"]
    return model.model.get_rope_index(
        sample["input_ids"], sample["mm_token_type_ids"], **{k: sample[k] for k in keys if k in sample}
    )[0]


# -- Qwen2-VL / Qwen2.5-VL / Qwen3-VL ---------------------------------------------------------------------------


@pytest.mark.parametrize("family", list(QWEN))
def test_qwen_no_drop_equals_unpatched(family):
    model = QWEN[family]()
    batch = collate(qwen_samples(family))
    with torch.no_grad():
        before = model(**batch).logits
    unpatched = greedy(model, batch, STEPS)
    apply_pyramid_drop(model, PyramidDropConfig(layer_list=[2], image_token_ratio_list=[1.0], position_mode="original"))
    with torch.no_grad():
        after = model(**batch).logits
    patched = greedy(model, batch, STEPS)
    assert torch.equal(after, before)
    assert torch.equal(patched.sequences, unpatched.sequences)


@pytest.mark.parametrize("family", list(QWEN))
def test_qwen_compact_positions_are_rejected(family):
    with pytest.raises(ValueError, match=r"M-RoPE.*position_mode='original'"):
        apply_pyramid_drop(QWEN[family](), replace(PDROP, position_mode="compact"))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", list(QWEN))
def test_qwen_dropped_forward_equals_layer_by_layer_with_original_3d_positions(family, attn):
    model = QWEN[family](attn)
    for sample in qwen_samples(family):
        assert layer_by_layer(model, sample, rope_positions(model, sample), PDROP) < 1e-5


@pytest.mark.parametrize("family", list(QWEN))
def test_qwen_kept_counts(family):
    config = replace(PDROP, layer_list=[2, 3, 4], image_token_ratio_list=[0.6, 0.3, 0.15])
    model = apply_pyramid_drop(QWEN[family](), config)
    batch = collate(qwen_samples(family))
    with torch.no_grad():
        model(**batch)
    record = get_drop_record(model)
    assert record.num_visual_tokens == [16, 64, 24 + 8]
    assert record.num_layout_tokens == [0, 0, 0]
    for row, visual in enumerate(record.num_visual_tokens):
        counts = [len(kept) for kept in record.kept_visual_indices[row]]
        assert counts == [visual, int(visual * 0.6), int(visual * 0.3), int(visual * 0.15)]
        assert record.visual_tokens_per_layer[row].tolist() == [counts[0]] * 2 + counts[1:] + [counts[3]]
        for earlier, later in zip(record.kept_visual_indices[row], record.kept_visual_indices[row][1:]):
            assert set(later.tolist()) <= set(earlier.tolist())
    assert record.visual_frame_index[1].tolist() == [frame for frame in range(4) for _ in range(16)]
    assert (record.visual_frame_index[0] == -1).all() and (record.visual_frame_index[2] == -1).all()


@pytest.mark.parametrize("family", list(QWEN))
def test_qwen_frame_pool_keeps_the_same_fraction_of_every_frame(family):
    model = QWEN[family]()
    samples = qwen_samples(family)
    samples[1] = qwen_sample(
        [2, ("image", 8, 8), 1, ("video", 4, 8, 8), 2], seed=2, frame_blocks=family.startswith("qwen3")
    )
    batch = collate(samples)
    apply_pyramid_drop(model, replace(PDROP, image_token_ratio_list=[0.3, 0.2], video_pool="frame"))
    with torch.no_grad():
        model(**batch)
    record = get_drop_record(model)
    frames = record.visual_frame_index[1]
    assert frames.tolist() == [-1] * 16 + [frame for frame in range(4) for _ in range(16)]
    for stage, ratio in [(1, 0.3), (2, 0.2)]:
        kept = frames[record.kept_visual_indices[1][stage]]
        # The image (16 tokens) and every frame (16 tokens) each keep int(16 * ratio).
        assert [int((kept == frame).sum()) for frame in [-1, 0, 1, 2, 3]] == [int(16 * ratio)] * 5
        # Samples without video rank as one pool.
        assert len(record.kept_visual_indices[2][stage]) == int(32 * ratio)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("batch_size", [1, 3])
@pytest.mark.parametrize("family", list(QWEN))
def test_qwen_cached_decoding_equals_full_recompute(family, batch_size, attn):
    """Batch 3: an image, a video and two images, left-padded; decoding continues from the model's rope_deltas."""
    model = QWEN[family](attn)
    samples = qwen_samples(family)
    check_cached_decoding(model, collate(samples[-batch_size:]), PDROP)


def test_qwen2_vl_frame_pool_cached_decoding_equals_full_recompute():
    check_cached_decoding(tiny_qwen2_vl(), collate(qwen_samples("qwen2_vl")), replace(PDROP, video_pool="frame"))


@pytest.mark.parametrize("family", list(QWEN))
def test_qwen_padded_batch_with_image_and_video_equals_samples_alone(family):
    model = apply_pyramid_drop(QWEN[family](), PDROP)
    check_samples_alone(model, qwen_samples(family))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_qwen2_vl_sliding_window_layers(attn):
    """Layers 2.. use a window of 12 cache slots (shorter than the prompts), in prefill and decode."""
    model = tiny_qwen2_vl(attn, sliding_window=12)
    assert model.config.text_config.layer_types[1:3] == ["full_attention", "sliding_attention"]
    sample = qwen_samples("qwen2_vl")[0]
    assert layer_by_layer(model, sample, rope_positions(model, sample), PDROP) < 1e-5
    batch = collate(qwen_samples("qwen2_vl"))
    check_cached_decoding(model, batch, PDROP)
    # The window matters: the same drop without it gives other logits.
    apply_pyramid_drop(model, PDROP)
    with torch.no_grad():
        windowed = model(**batch).logits[:, -1]
        model.model.language_model.config.layer_types = ["full_attention"] * 6
        apply_pyramid_drop(model, PDROP)
        full = model(**batch).logits[:, -1]
    assert (windowed - full).abs().max().item() > 1e-3


def test_qwen3_vl_rejects_a_drop_before_all_deepstack_features_are_added():
    model = tiny_qwen3_vl()
    with pytest.raises(ValueError, match=r"DeepStack.*first 2 decoder layers.*layer_list entries >= 2"):
        apply_pyramid_drop(model, replace(PDROP, layer_list=[1, 4]))
    apply_pyramid_drop(model, PDROP)  # the first drop after layer 2: all DeepStack features are in


def test_video_pool_is_validated():
    with pytest.raises(ValueError, match=r"video_pool must be one of \('sample', 'frame'\), got 'clip'"):
        PyramidDropConfig(video_pool="clip")


# -- LLaVA-OneVision -------------------------------------------------------------------------------------------


def test_onevision_no_drop_equals_unpatched():
    model = tiny_llava_onevision()
    batch = collate(onevision_samples(model))
    with torch.no_grad():
        before = model(**batch).logits
    apply_pyramid_drop(model, PyramidDropConfig(layer_list=[2], image_token_ratio_list=[1.0]))
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, before)


def test_onevision_kept_counts_newlines_and_frames():
    model = tiny_llava_onevision()
    samples = onevision_samples(model)
    apply_pyramid_drop(model, PyramidDropConfig(layer_list=[2, 4], image_token_ratio_list=[0.5, 0.25]))
    with torch.no_grad():
        model(**collate(samples))
    record = get_drop_record(model)
    # 28x28 image: base 16 + one crop of 4x4 with a newline per row; 56x50: base + 2x2 crops (8x8).
    assert record.num_layout_tokens == [4, 1, 8]
    assert record.num_visual_tokens == [32, 16, 16 + 8 * 8]
    for row, visual in enumerate(record.num_visual_tokens):
        counts = [len(kept) for kept in record.kept_visual_indices[row]]
        assert counts == [visual, int(visual * 0.5), int(visual * 0.25)]
        layout = record.num_layout_tokens[row]
        assert record.visual_tokens_per_layer[row, -1] == counts[-1] + layout  # newlines are never dropped
    assert record.visual_frame_index[1].tolist() == [frame for frame in range(4) for _ in range(4)]

    apply_pyramid_drop(
        model, PyramidDropConfig(layer_list=[2, 4], image_token_ratio_list=[0.5, 0.25], video_pool="frame")
    )
    with torch.no_grad():
        model(**collate(samples))
    record = get_drop_record(model)
    for stage, per_frame in [(1, 2), (2, 1)]:
        kept = record.visual_frame_index[1][record.kept_visual_indices[1][stage]]
        assert kept.tolist() == [frame for frame in range(4) for _ in range(per_frame)]


@pytest.mark.parametrize("position_mode", ["compact", "original"])
def test_onevision_dropped_forward_equals_layer_by_layer(position_mode):
    model = tiny_llava_onevision("eager")
    for sample in onevision_samples(model):
        positions = torch.arange(sample["input_ids"].shape[1])[None]
        assert layer_by_layer(model, sample, positions, replace(PDROP, position_mode=position_mode)) < 1e-5


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("position_mode", ["compact", "original"])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_onevision_cached_decoding_equals_full_recompute(batch_size, position_mode, attn):
    model = tiny_llava_onevision(attn)
    samples = onevision_samples(model)
    check_cached_decoding(model, collate(samples[-batch_size:]), replace(PDROP, position_mode=position_mode))


@pytest.mark.parametrize("video_pool", ["sample", "frame"])
def test_onevision_padded_batch_with_images_and_video_equals_samples_alone(video_pool):
    model = tiny_llava_onevision()
    apply_pyramid_drop(model, replace(PDROP, position_mode="compact", video_pool=video_pool))
    check_samples_alone(model, onevision_samples(model))


# -- pictures ---------------------------------------------------------------------------------------------------


def _frames(count: int, size: tuple[int, int]) -> list:
    from PIL import Image, ImageDraw

    frames = []
    for index in range(count):
        image = Image.new("RGB", size, (40 + 20 * index, 120, 200))
        ImageDraw.Draw(image).ellipse([4 * index, 8, 4 * index + size[0] // 3, 8 + size[1] // 3], fill=(250, 200, 0))
        frames.append(image)
    return frames


def test_show_draws_video_kept_tokens_as_a_frame_strip(tmp_path):
    from PIL import Image

    from pyramiddrop.tools.show import show_video_kept_tokens

    model = apply_pyramid_drop(tiny_qwen2_vl(), PDROP)
    sample = qwen_sample([2, ("video", 4, 8, 12), 3], seed=5)  # 4 temporal patches (8 frames) of 4x6 tokens
    path = tmp_path / "strip.png"
    counts = show_video_kept_tokens(model, sample, _frames(8, (96, 64)), str(path))
    record = get_drop_record(model)
    assert counts[0] == [24] * 4
    for stage, kept in enumerate(record.kept_visual_indices[0]):
        assert counts[stage] == [int((record.visual_frame_index[0][kept] == frame).sum()) for frame in range(4)]
    assert [sum(stage) for stage in counts] == [96, 48, 24]
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > image.size[1]

    model = tiny_llava_onevision()
    apply_pyramid_drop(model, replace(PDROP, video_pool="frame"))
    sample = onevision_sample(model, 2, ("video", 4), 2, seed=2)
    counts = show_video_kept_tokens(model, sample, _frames(4, (56, 56)), str(tmp_path / "onevision.png"))
    assert counts == [[4] * 4, [2] * 4, [1] * 4]
