"""The paper's FLOPs convention reproduces its numbers; the end-to-end count is consistent with it."""

import pytest
from transformers import LlamaConfig

from pyramiddrop import PyramidDropConfig
from pyramiddrop.flops import paper_flops, prefill_flops

PDROP = PyramidDropConfig(layer_list=[8, 16, 24], image_token_ratio_list=[0.5, 0.25, 0.125])
LLAVA_7B = LlamaConfig(
    hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, vocab_size=32064
)


@pytest.mark.parametrize(
    "tokens, config, tflops",
    [
        (576, None, 3.82),
        (576, PDROP, 1.78),
        (2880, None, 20.8),
        (2880, PDROP, 9.46),
        (5184, None, 40.6),
        (576, PyramidDropConfig(layer_list=[10, 20], image_token_ratio_list=[0.5, 0.25]), 2.13),
        (2880, PyramidDropConfig(layer_list=[2], image_token_ratio_list=[0.5]), 10.6),  # FastV K=2 R=50%
    ],
)
def test_paper_numbers(tokens, config, tflops):
    assert round(paper_flops(32, 4096, 11008, tokens, config) / 1e12, 2 if tflops < 10 else 1) == tflops


def test_end_to_end_counts_text_and_lm_head():
    no_text = prefill_flops(LLAVA_7B, 0, 576, lm_head_tokens=0)
    assert no_text == pytest.approx(paper_flops(32, 4096, 11008, 576), rel=1e-12)  # MHA, no text: same formula
    full = prefill_flops(LLAVA_7B, 64, 576)
    dropped = prefill_flops(LLAVA_7B, 64, 576, PDROP)
    assert full > no_text
    # Text tokens are never dropped, so the end-to-end saving is smaller than the paper's visual-only saving.
    assert 1 - dropped / full < 1 - paper_flops(32, 4096, 11008, 576, PDROP) / paper_flops(32, 4096, 11008, 576)
    gqa = LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8
    )
    assert prefill_flops(gqa, 64, 576) < full
