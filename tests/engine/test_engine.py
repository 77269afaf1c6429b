"""Behaviour of the engine on tiny random LLaVA / LLaVA-NeXT models (float32, CPU)."""

import copy
from dataclasses import replace

import pytest
import torch
from generation_checks import full_recompute, greedy, replay_scorer
from tiny_models import IMAGE_TOKEN_ID, llava_batch, pad, sample, tiny_llava, tiny_llava_next

from pyramiddrop import PyramidDropConfig, apply_pyramid_drop, get_drop_record, remove_pyramid_drop

STEPS = 8
PDROP = PyramidDropConfig(layer_list=[2, 4], image_token_ratio_list=[0.5, 0.25])
# (text before the image, images, text after): different lengths, so batches are padded.
PROMPTS = [(3, 1, 6), (1, 1, 2), (5, 2, 4)]

_REPLAY = replay_scorer("replay_for_tests")


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("position_mode", ["compact", "original"])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_cached_decoding_equals_full_recompute(attn, kv_heads, position_mode, batch_size):
    model = tiny_llava(attn, kv_heads)
    batch = llava_batch(PROMPTS[:batch_size])
    config = replace(PDROP, position_mode=position_mode)
    apply_pyramid_drop(model, config)
    out = greedy(model, batch, STEPS)
    _REPLAY["kept"] = get_drop_record(model).kept_visual_indices
    assert any(len(kept[2]) < len(kept[0]) for kept in _REPLAY["kept"])

    apply_pyramid_drop(model, replace(config, method="replay_for_tests"))
    prompt_length = batch["input_ids"].shape[1]
    for step in range(STEPS):
        logits = full_recompute(model, batch, out.sequences, step)
        assert (logits - out.logits[step]).abs().max().item() < 1e-4, f"step {step}"
        assert torch.equal(logits.argmax(-1), out.sequences[:, prompt_length + step])


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("position_mode", ["compact", "original"])
def test_padded_batch_equals_samples_alone(attn, position_mode):
    model = apply_pyramid_drop(tiny_llava(attn, kv_heads=2), replace(PDROP, position_mode=position_mode))
    batch = llava_batch(PROMPTS)
    out = greedy(model, batch, STEPS)
    batch_record = get_drop_record(model)
    prompt_length = batch["input_ids"].shape[1]
    for index in range(len(PROMPTS)):
        alone = sample(batch, index)
        single = greedy(model, alone, STEPS)
        assert (
            single.sequences[0, alone["input_ids"].shape[1] :].tolist() == out.sequences[index, prompt_length:].tolist()
        )
        for step in range(STEPS):
            assert (single.logits[step][0] - out.logits[step][index]).abs().max().item() < 1e-4
        alone_record = get_drop_record(model)
        for stage in range(3):
            assert torch.equal(
                alone_record.kept_visual_indices[0][stage], batch_record.kept_visual_indices[index][stage]
            )


def test_right_padding_keeps_the_same_tokens_as_left_padding():
    model = apply_pyramid_drop(tiny_llava(), PDROP)
    kept = {}
    for side in ["left", "right"]:
        batch = llava_batch(PROMPTS, padding=side)
        with torch.no_grad():
            model(**batch)
        kept[side] = get_drop_record(model).kept_visual_indices
    for left, right in zip(kept["left"], kept["right"]):
        assert all(torch.equal(a, b) for a, b in zip(left, right))


def test_kept_counts_follow_int_of_n_times_ratio():
    model = apply_pyramid_drop(
        tiny_llava(), PyramidDropConfig(layer_list=[1, 3, 5], image_token_ratio_list=[0.6, 0.3, 0.15])
    )
    batch = llava_batch(PROMPTS)
    with torch.no_grad():
        model(**batch)
    record = get_drop_record(model)
    assert record.num_visual_tokens == [64, 64, 128]
    for row, visual in enumerate(record.num_visual_tokens):
        counts = [len(kept) for kept in record.kept_visual_indices[row]]
        assert counts == [visual, int(visual * 0.6), int(visual * 0.3), int(visual * 0.15)]
        assert record.visual_tokens_per_layer[row].tolist() == [
            counts[0],
            counts[1],
            counts[1],
            counts[2],
            counts[2],
            counts[3],
        ]
        # Later stages choose among the survivors of earlier ones.
        for earlier, later in zip(record.kept_visual_indices[row], record.kept_visual_indices[row][1:]):
            assert set(later.tolist()) <= set(earlier.tolist())
    text = (batch["attention_mask"].sum(1) - torch.tensor(record.num_visual_tokens)).tolist()
    assert record.tokens_per_layer[:, -1].tolist() == [
        t + int(v * 0.15) for t, v in zip(text, record.num_visual_tokens)
    ]


def test_a_ratio_that_would_keep_nothing_keeps_one_token():
    model = apply_pyramid_drop(tiny_llava(), PyramidDropConfig(layer_list=[2], image_token_ratio_list=[0.01]))
    with torch.no_grad():
        model(**llava_batch(PROMPTS[:1]))
    assert [len(kept) for kept in get_drop_record(model).kept_visual_indices[0]] == [64, 1]


def test_ranking_equals_brute_force_attention():
    """Kept sets equal top-k of the next layer's eager attention (output_attentions), last row, mean over heads."""
    model = tiny_llava("eager", kv_heads=2)
    batch = llava_batch(PROMPTS)
    config = PyramidDropConfig(layer_list=[2, 4], image_token_ratio_list=[0.5, 0.2])
    apply_pyramid_drop(model, config)
    with torch.no_grad():
        model(**batch)
    expected = get_drop_record(model).kept_visual_indices

    # First drop: attention of layer 2 in the unpatched model.
    remove_pyramid_drop(model)
    with torch.no_grad():
        attentions = model(**batch, output_attentions=True).attentions
    visual = batch["input_ids"] == IMAGE_TOKEN_ID
    for row in range(len(PROMPTS)):
        scores = attentions[2][row, :, -1].mean(0)[visual[row]]
        brute = scores.topk(int(visual[row].sum() * 0.5)).indices.sort().values
        assert brute.tolist() == expected[row][1].tolist()

    # Second drop: attention of layer 4 on the sequence left after the first drop.
    apply_pyramid_drop(model, PyramidDropConfig(layer_list=[2], image_token_ratio_list=[0.5]))
    with torch.no_grad():
        attentions = model(**batch, output_attentions=True).attentions
    record = get_drop_record(model)
    for row in range(len(PROMPTS)):
        source = record.kept_positions[row]
        is_visual = (source >= 0) & visual[row][source.clamp(min=0)]
        scores = attentions[4][row, :, -1].mean(0)[is_visual]
        survivors = record.kept_visual_indices[row][1]
        brute = survivors[scores.topk(int(visual[row].sum() * 0.2)).indices.sort().values]
        assert brute.tolist() == expected[row][2].tolist()


def test_rows_without_an_image_are_unchanged():
    model = tiny_llava(kv_heads=2)
    rows = [[1, 5, 6, 7, 8, 9], [1] + [IMAGE_TOKEN_ID] * 64 + [5, 6, 7], [1, 9, 8]]
    input_ids, attention_mask = pad(rows)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": torch.randn(1, 3, 56, 56)}
    with torch.no_grad():
        before = model(**batch).logits[:, -1]
        apply_pyramid_drop(model, PDROP)
        after = model(**batch).logits[:, -1]
    record = get_drop_record(model)
    assert record.num_visual_tokens == [0, 64, 0]
    assert [len(kept) for kept in record.kept_visual_indices[1]] == [64, 32, 16]
    assert (after[[0, 2]] - before[[0, 2]]).abs().max().item() <= 1e-5
    # With decoding: the text-only rows of a mixed batch generate what they generate alone and unpatched.
    out = greedy(model, batch, STEPS)
    remove_pyramid_drop(model)
    for index in [0, 2]:
        alone = greedy(model, sample(batch, index), STEPS)
        assert alone.sequences[0, -STEPS:].tolist() == out.sequences[index, -STEPS:].tolist()


def test_visual_token_free_batch_matches_unpatched_model():
    model = tiny_llava()
    input_ids, attention_mask = pad([[1, 5, 6, 7, 8, 9], [1, 9, 8]])
    with torch.no_grad():
        before = model(input_ids=input_ids, attention_mask=attention_mask).logits
        apply_pyramid_drop(model, PDROP)
        after = model(input_ids=input_ids, attention_mask=attention_mask).logits
    assert (after - before).abs().max().item() <= 1e-6


def test_remove_restores_the_never_patched_model_exactly():
    never_patched = tiny_llava()
    model = copy.deepcopy(never_patched)
    batch = llava_batch(PROMPTS)
    apply_pyramid_drop(model, PDROP)
    with torch.no_grad():
        dropped = model(**batch).logits
        remove_pyramid_drop(model)
        restored = model(**batch).logits
        expected = never_patched(**batch).logits
    assert dropped.shape[1] < expected.shape[1]
    assert torch.equal(restored, expected)
    assert not hasattr(model.config, "pyramid_drop")
    assert not model._forward_pre_hooks and not model.model.language_model.layers[3]._forward_pre_hooks


def test_llava_next_anyres_batch_with_two_image_sizes():
    model = tiny_llava_next(kv_heads=2)
    image_sizes = torch.tensor([[28, 28], [56, 56]])
    pixel_values = torch.randn(2, 5, 3, 28, 28)
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=pixel_values, image_sizes=image_sizes).pooler_output
    counts = [len(f) for f in features]
    assert counts[0] != counts[1]
    rows = [[1, 7, 8] + [IMAGE_TOKEN_ID] * count + [9, 10, 11, 12][: 2 + index] for index, count in enumerate(counts)]
    input_ids, attention_mask = pad(rows)
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "pixel_values": pixel_values,
        "image_sizes": image_sizes,
    }
    apply_pyramid_drop(model, PDROP)
    out = greedy(model, batch, STEPS)
    record = get_drop_record(model)
    for row, count in enumerate(counts):
        layout, visual = record.num_layout_tokens[row], record.num_visual_tokens[row]
        newlines = int((features[row] == model.model.image_newline).all(-1).sum())
        assert layout == newlines > 0 and visual + layout == count
        assert [len(kept) for kept in record.kept_visual_indices[row]] == [
            visual,
            int(visual * 0.5),
            int(visual * 0.25),
        ]
        assert record.visual_tokens_per_layer[row, -1] == int(visual * 0.25) + layout  # newlines are never dropped
    # Each sample alone generates what it generated in the padded batch.
    for row in range(2):
        keep = attention_mask[row].bool()
        alone = {
            "input_ids": input_ids[row][keep][None],
            "attention_mask": torch.ones(1, int(keep.sum()), dtype=torch.long),
            "pixel_values": pixel_values[row : row + 1],
            "image_sizes": image_sizes[row : row + 1],
        }
        single = greedy(model, alone, STEPS)
        assert single.sequences[0, -STEPS:].tolist() == out.sequences[row, -STEPS:].tolist()
        assert (single.logits[0][0] - out.logits[0][row]).abs().max().item() < 1e-4


def test_loss_with_labels_uses_the_gathered_sequence():
    model = tiny_llava()
    batch = llava_batch(PROMPTS, padding="right")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    labels = labels.masked_fill(labels == IMAGE_TOKEN_ID, -100)
    with torch.no_grad():
        unpatched = model(**batch, labels=labels).loss
        apply_pyramid_drop(model, PyramidDropConfig(layer_list=[2], image_token_ratio_list=[1.0]))
        assert torch.equal(model(**batch, labels=labels).loss, unpatched)
        apply_pyramid_drop(model, PDROP)
        out = model(**batch, labels=labels)
    source = get_drop_record(model).kept_positions
    gathered = labels.gather(1, source.clamp(min=0)).masked_fill(source < 0, -100)
    manual = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), gathered[:, 1:].flatten())
    assert torch.allclose(out.loss, manual, atol=1e-6)
