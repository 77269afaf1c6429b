"""vLLM + PyramidDrop on a tiny Qwen2-VL and Qwen2.5-VL (M-RoPE positions, kept tokens keep theirs) gives the greedy
tokens of our transformers engine: requests with images of different sizes (different visual-token counts), the
image at different places and two images in one prompt, batched together, joining while others decode and
preempted, with 2 drops (pdrop) and FastV; `position_mode='compact'` is refused at start."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm.entrypoints.llm", reason="needs the vLLM environment: ./setup-vllm.sh")

from engines import engine, greedy, joining_while_decoding, preempted, tokens  # noqa: E402
from reference import transformers_tokens  # noqa: E402
from tiny_llava_dir import save_tiny_qwen  # noqa: E402
from tiny_processors import images  # noqa: E402

from pyramiddrop import PyramidDropConfig  # noqa: E402

MAX_NEW = 10
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
PROMPTS = [
    f"user: {IMAGE} w5 w6 w7 assistant:",
    f"user: w8 w9 {IMAGE} w10 w11 w12 w13 assistant:",
    f"user: w20 {IMAGE} assistant:",
    f"user: {IMAGE} w30 w31 w32 w33 w34 w35 w36 w37 w38 assistant:",
    f"user: {IMAGE} w40 {IMAGE} w41 w42 assistant:",  # two images rank as one group
]
SCHEDULES = {
    "pdrop-2-drops": PyramidDropConfig(layer_list=[1, 2], image_token_ratio_list=[0.5, 0.25], position_mode="original"),
    "fastv": PyramidDropConfig.fastv(2, 0.25),  # original positions, ranked with layer 1's attention
}


SIZES = [[(24, 20)], [(32, 24)], [(48, 32)], [(40, 40)], [(24, 24), (32, 20)]]


def requests() -> list[dict]:
    """Images of 24x20 to 40x40 px (the processor caps the area at 32x32 px): 30 to 64 visual tokens each (2 px
    patches merged 2x2); prompts of 39 to 87 tokens."""
    out = []
    for index, (prompt, sizes) in enumerate(zip(PROMPTS, SIZES)):
        pictures = images(sizes, seed=index)
        out.append({"prompt": prompt, "multi_modal_data": {"image": pictures if len(sizes) > 1 else pictures[0]}})
    return out


FAMILIES = ("qwen2_vl", "qwen2_5_vl")


@pytest.fixture(scope="module", params=FAMILIES)
def model_dir(request, tmp_path_factory):
    return save_tiny_qwen(tmp_path_factory.mktemp(request.param), request.param)


@pytest.fixture(scope="module", params=sorted(SCHEDULES))
def served(request, model_dir):
    """(engine, the transformers engine's tokens) per family and schedule; one engine start each."""
    config = SCHEDULES[request.param]
    expected = transformers_tokens(model_dir, config, requests(), MAX_NEW)
    assert expected != transformers_tokens(model_dir, None, requests(), MAX_NEW)  # the drops change the tokens
    with engine(model_dir, config) as llm:
        yield llm, expected


def test_qwen2_vl_matches_transformers(served):
    llm, expected = served
    assert tokens(llm.generate(requests(), greedy(MAX_NEW))) == expected


def test_requests_joining_while_others_decode_match_transformers(served):
    """Steps that mix prefills (M-RoPE positions of an image grid) with decodes (positions from vLLM's M-RoPE
    deltas, over stages of different lengths)."""
    llm, expected = served
    assert joining_while_decoding(llm, requests(), first=2, steps=3, max_tokens=MAX_NEW) == expected


def test_preemption_matches_transformers(model_dir):
    """7 blocks of 32 tokens (one is vLLM's null block) for 5 requests of 63-111 tokens: vLLM preempts running
    requests and recomputes them (a new prefill over prompt + generated tokens, whose M-RoPE positions vLLM
    computes again)."""
    config = SCHEDULES["pdrop-2-drops"]
    expected = transformers_tokens(model_dir, config, requests(), 24)
    assert preempted(model_dir, config, requests(), 24, blocks=7, max_model_len=192) == expected


def test_compact_positions_are_refused(model_dir):
    from vllm.engine.arg_utils import EngineArgs

    schedule = {"layer_list": [1], "image_token_ratio_list": [0.5], "position_mode": "compact"}
    args = EngineArgs(model=str(model_dir), hf_overrides={"pyramid_drop": schedule}, dtype="float32", max_model_len=512)
    with pytest.raises(Exception, match="Qwen2(.5)?-VL keeps the kept tokens' M-RoPE positions") as error:
        args.create_engine_config()
    assert "Set position_mode='original'" in str(error.value)
