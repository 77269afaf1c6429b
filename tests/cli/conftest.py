"""Fixtures of the command-line tests: the tiny random LLaVA saved as a local model directory (model, processor and
an image), a few questions about it, and `pdrop generate` on it. Built once per test module, so the files a
module's tests write beside them never meet another module's."""

import json
from pathlib import Path

import pytest
from PIL import Image
from tiny_models import save_tiny_llava_with_processor

from pyramiddrop.cli import main


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The tiny LLaVA with its processor (offline, Auto classes) and `image.png`."""
    directory = tmp_path_factory.mktemp("tiny_llava")
    save_tiny_llava_with_processor(directory)
    Image.new("RGB", (80, 60), (200, 30, 30)).save(directory / "image.png")
    return directory


@pytest.fixture(scope="module")
def questions_jsonl(tiny_model_dir) -> Path:
    """Six questions with answers about six small images in the model directory, as `pdrop eval` reads them."""
    lines = []
    for index in range(6):
        Image.new("RGB", (56, 56), (40 * index, 90, 200 - 30 * index)).save(tiny_model_dir / f"q{index}.png")
        lines.append(json.dumps({"image": f"q{index}.png", "question": "what ?", "answer": "w7", "type": "t"}))
    path = tiny_model_dir / "questions.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def generate(tiny_model_dir):
    """`pdrop generate` on the tiny model directory's image (a fixed prompt, 4 new tokens) with the given flags."""

    def run(*flags: str) -> None:
        main(
            ["generate", "--model", str(tiny_model_dir), "--image", str(tiny_model_dir / "image.png")]
            + ["--prompt", "what ?", "--max-new-tokens", "4", *flags]
        )

    return run
