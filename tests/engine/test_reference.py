"""Fidelity to the official PyramidDrop code on its tiny LLaVA (outputs in tests/data/official_pdrop_public)."""

from pathlib import Path

import pytest
import torch
from transformers import LlavaForConditionalGeneration

from pyramiddrop import PyramidDropConfig, apply_pyramid_drop, get_drop_record

REFERENCE = Path(__file__).resolve().parents[1] / "data" / "official_pdrop_public"
CASES = torch.load(REFERENCE / "cases.pt", weights_only=True)


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def reference_model(request):
    model = LlavaForConditionalGeneration.from_pretrained(
        REFERENCE / "model", dtype=torch.float32, attn_implementation=request.param
    )
    return model.eval()


@pytest.mark.parametrize("name", ["P1_nodrop", "P1", "P2"])
def test_compact_mode_reproduces_official_outputs(reference_model, name):
    case = CASES["cases"][name]
    config = PyramidDropConfig(layer_list=case["layer_list"], image_token_ratio_list=case["ratios"])
    apply_pyramid_drop(reference_model, config)
    ids = case["input_ids"]
    steps = CASES["max_new_tokens"]
    with torch.no_grad():
        out = reference_model.generate(
            input_ids=ids,
            pixel_values=case["pixel_values"],
            attention_mask=torch.ones_like(ids),
            max_new_tokens=steps,
            min_new_tokens=steps,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    assert out.sequences[0, ids.shape[1] :].tolist() == case["tokens"].tolist()
    logits = torch.stack([step[0] for step in out.logits])
    assert (logits - case["step_logits"]).abs().max().item() <= 1e-4

    record = get_drop_record(reference_model)
    for stage, expected in enumerate(case["kept_image_indices"], start=1):
        assert record.kept_visual_indices[0][stage].tolist() == expected.tolist()
    cache = out.past_key_values
    lengths = [cache.layers[layer].keys.shape[-2] for layer in range(len(cache.layers))]
    assert lengths == case["kv_lens_after_decode"].tolist()
    prefill_lengths = [len(p) for p in case["prefill_position_ids_per_layer"]]
    assert record.tokens_per_layer[0].tolist() == prefill_lengths
