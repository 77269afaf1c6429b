"""LLaVA-NeXT: vLLM + PyramidDrop gives the transformers engine's greedy tokens for images of different sizes (so
different token counts per request: anyres grids), with the row-end tokens (`image_newline`) kept as layout."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm.entrypoints.llm", reason="needs the vLLM environment: ./setup-vllm.sh")

from engines import engine, greedy, tokens  # noqa: E402
from reference import transformers_tokens  # noqa: E402
from tiny_llava_dir import save_tiny_llava_next  # noqa: E402
from tiny_processors import images  # noqa: E402

from pyramiddrop import PyramidDropConfig  # noqa: E402

MAX_NEW = 12
SCHEDULE = PyramidDropConfig(layer_list=[1, 3], image_token_ratio_list=[0.5, 0.2])
SIZES = [(56, 56), (28, 56), (56, 28), (40, 40), (64, 30)]


def requests() -> list[dict]:
    words = ["w5 w6", "w7 w8 w9 w10 w11", "w12", "w13 w14 w15", "w16 w17 w18 w19 w20 w21 w22"]
    pictures = images(SIZES, seed=11)
    return [
        {"prompt": f"user: <image> {text} assistant:", "multi_modal_data": {"image": picture}}
        for text, picture in zip(words, pictures)
    ]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_llava_next(tmp_path_factory.mktemp("llava-next"))


def test_llava_next_matches_transformers(model_dir):
    expected = transformers_tokens(model_dir, SCHEDULE, requests(), MAX_NEW)
    assert expected != transformers_tokens(model_dir, None, requests(), MAX_NEW)
    with engine(model_dir, SCHEDULE, limit_mm_per_prompt={"image": 1}) as llm:
        prompt_lengths = [len(out.prompt_token_ids) for out in llm.generate(requests(), greedy(1))]
        assert len(set(prompt_lengths)) > 2, "the images should give different visual-token counts"
        assert tokens(llm.generate(requests(), greedy(MAX_NEW))) == expected
