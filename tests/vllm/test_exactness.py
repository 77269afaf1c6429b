"""vLLM + PyramidDrop gives the greedy tokens of our transformers engine (apply_pyramid_drop + generate) on a tiny
LLaVA-1.5: requests of different lengths batched together, requests joining while others decode, 1 to 3 drops,
both position modes, both query modes, FastV (ranking with the layer before the drop), and a KV budget small enough that vLLM preempts and recomputes requests."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm.entrypoints.llm", reason="needs the vLLM environment: ./setup-vllm.sh")

from engines import engine, greedy, joining_while_decoding, preempted, tokens  # noqa: E402
from reference import requests, transformers_tokens  # noqa: E402
from tiny_llava_dir import save_tiny_llava  # noqa: E402

from pyramiddrop import PyramidDropConfig  # noqa: E402

MAX_NEW = 12
SCHEDULES = {
    "compact-3-drops": PyramidDropConfig(layer_list=[1, 2, 3], image_token_ratio_list=[0.5, 0.25, 0.125]),
    "original-1-drop": PyramidDropConfig(layer_list=[2], image_token_ratio_list=[0.3], position_mode="original"),
    "fastv": PyramidDropConfig.fastv(2, 0.25),  # ranks with layer 1's attention, drops before layer 2
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_llava(tmp_path_factory.mktemp("llava"))


@pytest.fixture(scope="module", params=sorted(SCHEDULES))
def served(request, model_dir):
    """(engine, schedule, the transformers engine's tokens) per schedule; one engine start each."""
    config = SCHEDULES[request.param]
    expected = transformers_tokens(model_dir, config, requests(), MAX_NEW)
    with engine(model_dir, config) as llm:
        yield llm, config, expected


def test_batched_requests_match_transformers(served):
    llm, _, expected = served
    assert tokens(llm.generate(requests(), greedy(MAX_NEW))) == expected


def test_requests_joining_while_others_decode_match_transformers(served):
    llm, _, expected = served
    assert joining_while_decoding(llm, requests(), first=3, steps=4, max_tokens=MAX_NEW) == expected


def test_pyramid_drop_changes_the_tokens(served, model_dir):
    """The schedules drop enough that the tokens differ from the model without PyramidDrop (else the tests above
    could not tell a plugin that drops nothing)."""
    _, _, expected = served
    assert expected != transformers_tokens(model_dir, None, requests(), MAX_NEW)


def test_preemption_and_instruction_query_match_transformers(model_dir):
    """10 blocks of 32 tokens for 6 requests of 70-150 tokens: vLLM preempts running requests and recomputes them
    later (a new prefill over prompt + generated tokens, which must rank with the prompt's last token again)."""
    config = PyramidDropConfig(layer_list=[1, 3], image_token_ratio_list=[0.5, 0.2], query="instruction_mean")
    expected = transformers_tokens(model_dir, config, requests(), 24)
    assert preempted(model_dir, config, requests(), 24, blocks=10, max_model_len=256) == expected
