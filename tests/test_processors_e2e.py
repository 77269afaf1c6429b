"""Every supported family end to end from PIL images: the family's own processor class (its PIL image processor
and a small tokenizer with the family's special tokens and chat template) makes one left-padded batch of two
prompts with images of different sizes, and PyramidDrop generates from it. The record's visual-token counts must
be what the processor emitted, and each prompt alone must generate what it generated in the batch.

Not covered here: video inputs through a video processor (transformers' video processors need torchvision), and
Mistral 3's PixtralProcessor (it cannot be imported without torchvision; tiny_families.PixtralLayout stands in).
"""

from functools import partial

import pytest
import torch
from generation_checks import greedy
from tiny_families import FAMILIES
from tiny_models import (
    tiny_llava,
    tiny_llava_next,
    tiny_llava_onevision,
    tiny_qwen2_5_vl,
    tiny_qwen2_vl,
    tiny_qwen3_vl,
)
from tiny_processors import (
    images,
    llava_next_processor,
    llava_processor,
    onevision_processor,
    processed,
    qwen_processor,
)

from pyramiddrop import PyramidDropConfig, apply_pyramid_drop, get_drop_record
from pyramiddrop.adapters import get_adapter

STEPS = 4
TOL = 3e-5
RATIOS = [0.5, 0.25]

# name -> (model builder, processor builder, (width, height) of the two images, position_mode)
CASES = {
    "llava": (tiny_llava, llava_processor, [(40, 56), (80, 60)], "compact"),
    "llava_next": (tiny_llava_next, llava_next_processor, [(28, 28), (56, 50)], "compact"),
    "llava_onevision": (tiny_llava_onevision, onevision_processor, [(28, 28), (56, 50)], "compact"),
    "qwen2_vl": (tiny_qwen2_vl, partial(qwen_processor, "qwen2_vl"), [(16, 16), (24, 16)], "original"),
    "qwen2_5_vl": (tiny_qwen2_5_vl, partial(qwen_processor, "qwen2_5_vl"), [(16, 16), (32, 24)], "original"),
    "qwen3_vl": (tiny_qwen3_vl, partial(qwen_processor, "qwen3_vl"), [(16, 16), (24, 16)], "original"),
    "qwen3_vl_moe": (
        partial(tiny_qwen3_vl, moe=True),
        partial(qwen_processor, "qwen3_vl"),
        [(16, 16), (24, 16)],
        "original",
    ),
} | {name: (family.build, family.processor, family.image_sizes, "compact") for name, family in FAMILIES.items()}


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


@pytest.mark.parametrize("name", list(CASES))
def test_processor_batch_generates_with_the_processors_token_counts(name):
    build, make_processor, sizes, position_mode = CASES[name]
    model, processor = build(), make_processor()
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
