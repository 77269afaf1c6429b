"""Mistral 3 through the real `PixtralProcessor`, and the stand-in the torchvision-free suite uses checked against it.

`PixtralProcessor` refuses to be built without torchvision (transformers 5.19 and 5.24 both), so
tests/families/test_families.py and tests/families/test_processors_e2e.py lay out Mistral 3's prompts with
`tiny_families.PixtralLayout`; here it must emit exactly the real processor's token ids for images of many sizes."""

import pytest

pytest.importorskip("torchvision", reason="PixtralProcessor needs torchvision: run in .venv-vllm")

import torch  # noqa: E402
from processor_checks import check_processor_batch  # noqa: E402
from tiny_families import PixtralLayout, pixtral_processor, tiny_mistral3  # noqa: E402
from tiny_processors import images  # noqa: E402

pytestmark = pytest.mark.torchvision

# (width, height): square, wide, tall, sizes that are not multiples of the 14 px merged patch, up- and downscaled.
SIZES = [(56, 56), (112, 70), (50, 37), (30, 100), (13, 13), (113, 57), (200, 90)]


def test_stand_in_emits_what_pixtral_processor_emits():
    real, stand_in = pixtral_processor(), PixtralLayout()
    pictures = images(SIZES, seed=4)
    texts = [f"user: [IMG] w{5 + index} assistant:" for index in range(len(SIZES))]
    ours = real(text=texts, images=pictures, return_tensors="pt", padding=True)
    theirs = stand_in(texts, images=pictures)
    assert torch.equal(ours["input_ids"], theirs["input_ids"])
    assert torch.equal(ours["attention_mask"], theirs["attention_mask"])
    assert torch.equal(ours["image_sizes"], theirs["image_sizes"])
    # Pixels: the torchvision and PIL image processors agree to float rounding where an image keeps its size (the
    # first two) and differ by their resampling elsewhere (measured up to 0.03; pixels are normalised to [-2, 2]).
    difference = (ours["pixel_values"] - theirs["pixel_values"]).abs().amax(dim=(1, 2, 3))
    assert difference[:2].max() < 1e-6
    assert difference.max() < 0.05


def test_mistral3_batch_through_pixtral_processor():
    check_processor_batch("mistral3", tiny_mistral3(), pixtral_processor(), [(56, 56), (112, 70)], "compact")
