"""Config validation, persistence and apply/remove semantics."""

import pytest
import torch
from tiny_models import llava_batch, tiny_llava
from transformers import AutoModelForImageTextToText, LlamaConfig, LlamaForCausalLM

from pyramiddrop import (
    PyramidDropConfig,
    apply_pyramid_drop,
    get_drop_record,
    is_pyramid_drop_applied,
    remove_pyramid_drop,
)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"layer_list": [8, 16], "image_token_ratio_list": [0.5]},
            "layer_list has 2 entries but image_token_ratio_list has 1",
        ),
        ({"layer_list": [16, 8], "image_token_ratio_list": [0.5, 0.25]}, r"strictly increasing, got \[16, 8\]"),
        ({"layer_list": [8, 8], "image_token_ratio_list": [0.5, 0.25]}, "strictly increasing"),
        ({"layer_list": [-1, 8], "image_token_ratio_list": [0.5, 0.25]}, "must be >= 0, got -1"),
        ({"layer_list": [8, 16], "image_token_ratio_list": [0.25, 0.5]}, "strictly decreasing"),
        ({"layer_list": [8], "image_token_ratio_list": [0.0]}, r"in \(0, 1\], got 0.0"),
        ({"layer_list": [8], "image_token_ratio_list": [1.5]}, r"in \(0, 1\], got 1.5"),
        ({"layer_list": [8.5], "image_token_ratio_list": [0.5]}, "layer_list must hold integers"),
        ({"position_mode": "relative"}, "position_mode must be one of"),
        ({"method": "magic"}, "method must be one of"),
        ({"query": "first"}, "query must be one of"),
    ],
)
def test_invalid_configs_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PyramidDropConfig(**kwargs)


def test_from_lambda_is_the_papers_setting():
    config = PyramidDropConfig.from_lambda(num_layers=32, num_stages=4, lam=0.5)
    assert config.layer_list == [8, 16, 24]
    assert config.image_token_ratio_list == [0.5, 0.25, 0.125]
    assert PyramidDropConfig.from_lambda(num_layers=6, num_stages=3, lam=0.4).layer_list == [2, 4]
    with pytest.raises(ValueError, match=r"lam must be in \(0, 1\), got 1.2"):
        PyramidDropConfig.from_lambda(num_layers=32, num_stages=4, lam=1.2)
    with pytest.raises(ValueError, match=r"num_stages must be in \[1, num_layers=8\], got 9"):
        PyramidDropConfig.from_lambda(num_layers=8, num_stages=9, lam=0.5)


def test_layer_beyond_the_model_fails_at_apply_time():
    with pytest.raises(ValueError, match=r"layer_list entry 6 is outside \[0, 5\] for a language model with 6"):
        apply_pyramid_drop(tiny_llava(), PyramidDropConfig(layer_list=[2, 6], image_token_ratio_list=[0.5, 0.25]))


def test_unsupported_model_lists_the_supported_families():
    model = LlamaForCausalLM(
        LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2)
    )
    with pytest.raises(
        ValueError, match=r"does not support model type 'llama'.*LLaVA-1.5 \(llava\), LLaVA-NeXT \(llava_next\)"
    ):
        apply_pyramid_drop(model, PyramidDropConfig())


def test_apply_without_config_needs_a_saved_one():
    with pytest.raises(ValueError, match="got no config and the model has none saved"):
        apply_pyramid_drop(tiny_llava())
    with pytest.raises(ValueError, match="not applied"):
        remove_pyramid_drop(tiny_llava())


def test_applying_twice_replaces_the_first_config():
    model = tiny_llava()
    layer = model.model.language_model.layers[5]
    apply_pyramid_drop(model, PyramidDropConfig(layer_list=[2], image_token_ratio_list=[0.5]))
    apply_pyramid_drop(model, PyramidDropConfig(layer_list=[4], image_token_ratio_list=[0.25]))
    assert len(layer._forward_pre_hooks) == 1 and len(model._forward_pre_hooks) == 1
    with torch.no_grad():
        model(**llava_batch([(2, 1, 3)]))
    record = get_drop_record(model)
    assert record.layer_list == [4]
    assert [len(kept) for kept in record.kept_visual_indices[0]] == [64, 16]
    remove_pyramid_drop(model)
    assert not is_pyramid_drop_applied(model) and not layer._forward_pre_hooks


def test_config_travels_with_save_pretrained(tmp_path):
    model = tiny_llava()
    config = PyramidDropConfig(layer_list=[2, 4], image_token_ratio_list=[0.4, 0.1], position_mode="original")
    apply_pyramid_drop(model, config)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    apply_pyramid_drop(loaded)
    assert PyramidDropConfig.from_dict(loaded.config.pyramid_drop) == config
    batch = llava_batch([(2, 1, 3)])
    with torch.no_grad():
        assert torch.allclose(model(**batch).logits, loaded(**batch).logits, atol=1e-6)
