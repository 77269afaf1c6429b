"""InternVL (Qwen2 and Qwen3 text), Mistral 3, Idefics3, SmolVLM and LLaVA-NeXT-Video on tiny random-weight models
(float32, CPU), with inputs from each family's processor: the core properties of the older families."""

from dataclasses import replace

import pytest
import torch
from generation_checks import assert_rows_equal_alone, full_recompute, greedy, replay_scorer
from tiny_families import FAMILIES, tiny_mistral3
from tiny_processors import images, processed

from pyramiddrop import PyramidDropConfig, apply_pyramid_drop, get_drop_record

STEPS = 5
TOL = 3e-5  # float32 logits: cached vs recomputed and batched vs alone differ by rounding only
PDROP = PyramidDropConfig(layer_list=[2, 4], image_token_ratio_list=[0.5, 0.25])
_REPLAY = replay_scorer("replay_for_family_tests")
_CACHE: dict = {}


def family_samples(name: str, model) -> list[tuple[str, list]]:
    """Three prompts: the small image, the large image (more tiles / rows), both images (or a 3-frame video)."""
    small, large = images(FAMILIES[name].image_sizes)
    third = [("video", 3)] if FAMILIES[name].video else [large, small]
    return [("w5 w6 w7", [small]), ("w8 w9", [large]), ("w10 w11 w12 w13 w14", third)]


def batch_of(name: str, model, rows: list[int] | None = None) -> dict:
    samples = family_samples(name, model)
    samples = [samples[row] for row in rows] if rows is not None else samples
    key = (name, tuple(rows or ()))
    if key not in _CACHE:
        processor = FAMILIES[name].processor()
        _CACHE[key] = processed(processor, [t for t, _ in samples], [v for _, v in samples], model)
    return _CACHE[key]


NAMES = list(FAMILIES)


@pytest.mark.parametrize("name", NAMES)
def test_no_drop_equals_unpatched(name):
    model = FAMILIES[name].build()
    batch = batch_of(name, model)
    with torch.no_grad():
        before = model(**batch).logits
    unpatched = greedy(model, batch, STEPS)
    apply_pyramid_drop(model, PyramidDropConfig(layer_list=[2], image_token_ratio_list=[1.0]))
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, before)
    assert torch.equal(greedy(model, batch, STEPS).sequences, unpatched.sequences)


def layout_counts(name: str, model, batch: dict) -> list[int]:
    """Layout tokens per sample as the processor emitted them: Pixtral's break / end tokens, or the newline
    vectors LLaVA-NeXT-Video's image features end each row with; none for the others."""
    if name == "mistral3":
        return torch.isin(batch["input_ids"], torch.tensor([101, 102])).sum(1).tolist()  # [IMG_BREAK], [IMG_END]
    if name == "llava_next_video":
        with torch.no_grad():
            features = model.model.get_image_features(batch["pixel_values"], batch["image_sizes"]).pooler_output
        per_image = [int((f == model.model.image_newline).all(-1).sum()) for f in features]
        images_per_row = (batch["input_ids"] == 100).any(1).long()
        counts, index = [], 0
        for row in range(batch["input_ids"].shape[0]):
            counts.append(sum(per_image[index : index + int(images_per_row[row])]))
            index += int(images_per_row[row])
        return counts
    return [0] * batch["input_ids"].shape[0]


@pytest.mark.parametrize("name", NAMES)
def test_kept_counts_follow_the_processor(name):
    model = FAMILIES[name].build()
    config = PyramidDropConfig(layer_list=[1, 3, 5], image_token_ratio_list=[0.6, 0.3, 0.15])
    apply_pyramid_drop(model, config)
    batch = batch_of(name, model)
    with torch.no_grad():
        model(**batch)
    record = get_drop_record(model)
    placeholders = torch.isin(batch["input_ids"], torch.tensor([100, 101] if FAMILIES[name].video else [100]))
    layout = layout_counts(name, model, batch)
    emitted = placeholders.sum(1).tolist()
    if name == "mistral3":  # placeholders are [IMG] only; the breaks are their own tokens
        emitted = [count + extra for count, extra in zip(emitted, layout)]
    assert record.num_layout_tokens == layout
    assert [v + n for v, n in zip(record.num_visual_tokens, layout)] == emitted
    for row, visual in enumerate(record.num_visual_tokens):
        counts = [len(kept) for kept in record.kept_visual_indices[row]]
        assert counts == [visual, int(visual * 0.6), int(visual * 0.3), int(visual * 0.15)]
        per_layer = [counts[0], counts[1], counts[1], counts[2], counts[2], counts[3]]
        assert record.visual_tokens_per_layer[row].tolist() == [c + layout[row] for c in per_layer]
        for earlier, later in zip(record.kept_visual_indices[row], record.kept_visual_indices[row][1:]):
            assert set(later.tolist()) <= set(earlier.tolist())


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("batch_size", [1, 3])
@pytest.mark.parametrize("name", NAMES)
def test_cached_decoding_equals_full_recompute(name, batch_size, attn):
    """Batch 3 is left-padded by the processor; batch 1 is the sample with two images (or the video)."""
    model = FAMILIES[name].build(attn)
    batch = batch_of(name, model, None if batch_size == 3 else [2])
    position_mode = "compact" if attn == "sdpa" else "original"
    apply_pyramid_drop(model, replace(PDROP, position_mode=position_mode))
    out = greedy(model, batch, STEPS)
    _REPLAY["kept"] = get_drop_record(model).kept_visual_indices
    assert all(len(kept[2]) < len(kept[0]) for kept in _REPLAY["kept"])
    apply_pyramid_drop(model, replace(PDROP, position_mode=position_mode, method="replay_for_family_tests"))
    prompt_length = batch["input_ids"].shape[1]
    for step in range(STEPS):
        logits = full_recompute(model, batch, out.sequences, step)
        assert (logits - out.logits[step]).abs().max().item() < TOL, f"step {step}"
        assert torch.equal(logits.argmax(-1), out.sequences[:, prompt_length + step])


@pytest.mark.parametrize("name", NAMES)
def test_padded_batch_equals_samples_alone(name):
    model = apply_pyramid_drop(FAMILIES[name].build(), PDROP)
    alone = [batch_of(name, model, [row]) for row in range(3)]
    assert all(sample["attention_mask"].all() for sample in alone)
    assert_rows_equal_alone(model, batch_of(name, model), alone, STEPS, TOL)


def test_llava_next_video_frames_are_pools():
    model = FAMILIES["llava_next_video"].build()
    batch = batch_of("llava_next_video", model)
    apply_pyramid_drop(model, replace(PDROP, video_pool="frame"))
    with torch.no_grad():
        model(**batch)
    record = get_drop_record(model)
    frames = record.visual_frame_index[2]
    assert frames.tolist() == [frame for frame in range(3) for _ in range(4)]  # 3 frames of 2x2 pooled tokens
    for stage, per_frame in [(1, 2), (2, 1)]:
        assert frames[record.kept_visual_indices[2][stage]].tolist() == [f for f in range(3) for _ in range(per_frame)]
    assert (record.visual_frame_index[0] == -1).all()


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_mistral3_sliding_window_text_model(attn):
    """Mistral's text model with a 12-slot window (shorter than the prompts): every layer slides, in prefill and
    decode, over the kept tokens of its stage."""
    model = tiny_mistral3(attn, sliding_window=12)
    batch = batch_of("mistral3", model)
    apply_pyramid_drop(model, PDROP)
    out = greedy(model, batch, STEPS)
    _REPLAY["kept"] = get_drop_record(model).kept_visual_indices
    apply_pyramid_drop(model, replace(PDROP, method="replay_for_family_tests"))
    for step in range(STEPS):
        assert (full_recompute(model, batch, out.sequences, step) - out.logits[step]).abs().max().item() < TOL


def test_mistral3_rejects_a_text_model_that_scales_queries_by_position():
    with pytest.raises(ValueError, match=r"Mistral 3 model's language model \(ministral3\) scales its queries"):
        apply_pyramid_drop(tiny_mistral3(text="ministral3"), PDROP)


def test_unsupported_family_lists_the_supported_ones():
    from tiny_models import _text_config
    from transformers import LlamaForCausalLM

    with pytest.raises(ValueError, match=r"does not support model type 'llama'.*InternVL \(internvl\).*Gemma 3"):
        apply_pyramid_drop(LlamaForCausalLM(_text_config(2, 2)), PDROP)


def test_a_language_model_without_rotary_embeddings_is_rejected():
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    text = dict(model_type="gpt2", vocab_size=128, n_embd=64, n_layer=2, n_head=4)
    model = InternVLForConditionalGeneration(
        InternVLConfig(vision_config=vision, text_config=text, image_token_id=100, tie_word_embeddings=False)
    )
    with pytest.raises(ValueError, match=r"InternVL model's language model \(gpt2\) has no `rotary_emb` module"):
        apply_pyramid_drop(model, PDROP)
