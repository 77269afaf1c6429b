"""Every supported family end to end from PIL images: the family's own processor class (its PIL image processor
and a small tokenizer with the family's special tokens and chat template) makes one left-padded batch of two
prompts with images of different sizes, and PyramidDrop generates from it. The record's visual-token counts must
be what the processor emitted, and each prompt alone must generate what it generated in the batch.

Not covered here (tests/processors/, in an environment with torchvision): video inputs through the video
processors, and Mistral 3's PixtralProcessor (it cannot be imported without torchvision; tiny_families.PixtralLayout
stands in here, and tests/processors/ checks that it emits what PixtralProcessor emits).
"""

from functools import partial

import pytest
from processor_checks import check_processor_batch
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
    llava_next_processor,
    llava_processor,
    onevision_processor,
    qwen_processor,
)

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


@pytest.mark.parametrize("name", list(CASES))
def test_processor_batch_generates_with_the_processors_token_counts(name):
    build, make_processor, sizes, position_mode = CASES[name]
    check_processor_batch(name, build(), make_processor(), sizes, position_mode)
