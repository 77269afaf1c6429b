"""The embedded model's image processor, PIL backend vs torchvision backend, on the images behind docs/results.md.

transformers picks `CLIPImageProcessor` (torchvision) when torchvision imports and `CLIPImageProcessorPil`
otherwise; the published numbers were measured in `.venv` (no torchvision: PIL). This prints, per image set, how
many images get different pixel values from the two backends and the largest difference, plus one image of another
size for contrast. Needs torchvision (run in `.venv-vllm`):

    .venv-vllm/bin/python benchmarks/processor_backends.py
"""

from __future__ import annotations

import torch
import transformers
from transformers import CLIPImageProcessor, CLIPImageProcessorPil

from pyramiddrop.synthetic.data import generate, make_split
from pyramiddrop.synthetic.model import require_embedded_model

SETS = {
    "test split (1000)": lambda: make_split("test"),
    "validation split (500)": lambda: make_split("validation"),
    "seed 101 (2000)": lambda: generate(2000, 101),
}


def compare(images: list, pil, torchvision, batch: int = 100) -> tuple[int, int, float]:
    """Images whose pixel values differ at all, those differing by more than 1e-6 (more than float rounding),
    and the largest absolute difference."""
    differing, beyond_rounding, largest = 0, 0, 0.0
    for start in range(0, len(images), batch):
        chunk = images[start : start + batch]
        a = pil(chunk, return_tensors="pt")["pixel_values"]
        b = torchvision(chunk, return_tensors="pt")["pixel_values"]
        per_image = (a - b).abs().flatten(1).amax(1)
        differing += int((per_image > 0).sum())
        beyond_rounding += int((per_image > 1e-6).sum())
        largest = max(largest, float(per_image.max()))
    return differing, beyond_rounding, largest


def main() -> None:
    directory = require_embedded_model()
    pil, torchvision = CLIPImageProcessorPil.from_pretrained(directory), CLIPImageProcessor.from_pretrained(directory)
    print(f"{'images':<26}{'differing':>10}{'by > 1e-6':>10}{'max |PIL - torchvision|':>26}")
    for name, examples in SETS.items():
        images = [example.image() for example in examples()]
        sizes = {image.size for image in images}
        differing, beyond, largest = compare(images, pil, torchvision)
        print(f"{name:<26}{differing:>10}{beyond:>10}{largest:>26.3g}   sizes {sorted(sizes)}")
    other = make_split("test")[0].image().resize((250, 210))  # resized and cropped by the processor
    differing, beyond, largest = compare([other], pil, torchvision)
    print(f"{'one 250 x 210 image':<26}{differing:>10}{beyond:>10}{largest:>26.3g}")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}")


if __name__ == "__main__":
    main()
