"""The end-to-end processor check shared by tests/families/test_processors_e2e.py (PIL image processors) and
tests/processors/ (the classes that need torchvision): one left-padded batch of two prompts with images of different
sizes, PyramidDrop generates from it, the record's counts are what the processor emitted, and each prompt alone
generates what it generated in the batch."""

from __future__ import annotations

import torch
from generation_checks import greedy
from tiny_processors import images, processed

from pyramiddrop import PyramidDropConfig, apply_pyramid_drop, get_drop_record
from pyramiddrop.adapters import get_adapter

STEPS = 4
TOL = 3e-5
RATIOS = [0.5, 0.25]


def emitted_layout(name: str, model, batch: dict) -> list[int]:
    """Layout tokens per prompt in what the processor emitted: Pixtral's `[IMG_BREAK]`/`[IMG_END]` ids, or the
    anyres newline vectors in the image features (LLaVA-NeXT family); zero elsewhere."""
    if name == "mistral3":
        return torch.isin(batch["input_ids"], torch.tensor([101, 102])).sum(1).tolist()
    if not hasattr(model.model, "image_newline"):
        return [0] * len(batch["input_ids"])
    with torch.no_grad():
        features = model.model.get_image_features(batch["pixel_values"], batch["image_sizes"]).pooler_output
    return [int((feature == model.model.image_newline).all(-1).sum()) for feature in features]  # one image a row


def check_processor_batch(name: str, model, processor, sizes: list, position_mode: str) -> dict:
    """`name` is the family (`mistral3`: Pixtral's layout tokens have ids of their own). Returns the batch."""
    small, large = images(sizes, seed=3)
    texts, visuals = ["w5 w6 w7 w8", "w9"], [[small], [large]]
    batch = processed(processor, texts, visuals, model)
    assert not batch["attention_mask"].all()  # the prompts differ in length: left padding
    apply_pyramid_drop(
        model, PyramidDropConfig(layer_list=[2, 4], image_token_ratio_list=RATIOS, position_mode=position_mode)
    )
    encoded = []  # the adapter names the module that encodes the pixels
    handle = get_adapter(model).vision_tower(model).register_forward_hook(lambda *args: encoded.append(1))
    out = greedy(model, batch, STEPS)
    handle.remove()
    assert encoded
    record = get_drop_record(model)

    placeholders = (batch["input_ids"] == model.config.image_token_id).sum(1).tolist()
    layout = emitted_layout(name, model, batch)
    if name != "mistral3":  # Pixtral's layout tokens are ids of their own, the others share the image id
        placeholders = [count - extra for count, extra in zip(placeholders, layout)]
    assert record.num_visual_tokens == placeholders
    assert record.num_layout_tokens == layout
    if name != "llava":  # LLaVA-1.5 resizes and crops every image to 56 px: 64 tokens whatever the size
        assert placeholders[0] != placeholders[1]  # the two sizes give different token counts
    for row, visual in enumerate(record.num_visual_tokens):
        counts = [len(kept) for kept in record.kept_visual_indices[row]]
        assert counts == [visual] + [int(visual * ratio) for ratio in RATIOS]
        assert record.visual_tokens_per_layer[row, -1] == counts[-1] + layout[row]

    for row in range(2):
        alone = processed(processor, texts[row : row + 1], visuals[row : row + 1], model)
        single = greedy(model, alone, STEPS)
        assert single.sequences[0, -STEPS:].tolist() == out.sequences[row, -STEPS:].tolist()
        assert max((a[0] - b[row]).abs().max().item() for a, b in zip(single.logits, out.logits)) < TOL
        assert get_drop_record(model).num_visual_tokens == [placeholders[row]]
    return batch
