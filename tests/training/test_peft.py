"""PEFT LoRA with PyramidDrop: both orders of apply / get_peft_model, exact losses, LoRA gradients, saving, merging."""

import pytest
import torch
from tiny_models import multi_turn_batch, tiny_llava, tiny_llava_next

from pyramiddrop import (
    PyramidDropConfig,
    apply_pyramid_drop,
    get_drop_record,
    is_pyramid_drop_applied,
    remove_pyramid_drop,
)

peft = pytest.importorskip("peft", reason="the peft extra: pip install 'pyramiddrop[peft]'")

PDROP = PyramidDropConfig(layer_list=[2, 4], image_token_ratio_list=[0.5, 0.25])
NUM_LAYERS = 6  # tiny_llava's decoder layers


def lora_config(**overrides) -> "peft.LoraConfig":
    # init_lora_weights=False: B starts random too, so the gradient of every A and every B is nonzero at step 0.
    settings = dict(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)",
        init_lora_weights=False,
    )
    return peft.LoraConfig(**(settings | overrides))


def lora_model(pyramid_drop: PyramidDropConfig | None = None, order: str = "apply_first", **lora):
    torch.manual_seed(0)  # the LoRA weights' init
    base = tiny_llava().train()
    if pyramid_drop is not None and order == "apply_first":
        apply_pyramid_drop(base, pyramid_drop)
    model = peft.get_peft_model(base, lora_config(**lora))
    if pyramid_drop is not None and order == "wrap_first":
        assert apply_pyramid_drop(model, pyramid_drop) is model
    return model


def lora_parameters(model) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if "lora_" in name}


@pytest.mark.parametrize("order", ["apply_first", "wrap_first"])
def test_both_orders_patch_the_base_model_and_train_every_lora_weight(order):
    model = lora_model(PDROP, order)
    base = model.get_base_model()
    assert is_pyramid_drop_applied(model) and is_pyramid_drop_applied(base)
    assert not model._forward_pre_hooks  # the hooks sit on the transformers model, not on the wrapper
    batch, _ = multi_turn_batch()
    loss = model(**batch).loss
    loss.backward()
    record = get_drop_record(model)
    assert [len(kept) for kept in record.kept_visual_indices[0]] == [64, 32, 16]
    grads = lora_parameters(model)
    assert len(grads) == 2 * 4 * NUM_LAYERS  # A and B of q, k, v, o in every layer
    for name, parameter in grads.items():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    frozen = [p for name, p in model.named_parameters() if "lora_" not in name]
    assert all(p.grad is None for p in frozen)
    # Both orders are the same model: same loss to float rounding.
    other = lora_model(PDROP, "wrap_first" if order == "apply_first" else "apply_first")
    assert torch.allclose(other(**batch).loss, loss, atol=1e-6)


def test_lora_with_ratio_one_equals_the_unpatched_lora_model():
    batch, _ = multi_turn_batch()
    plain = lora_model()
    patched = lora_model(PyramidDropConfig([2], [1.0]), "wrap_first")
    losses = []
    for model in (plain, patched):
        loss = model(**batch).loss
        loss.backward()
        losses.append(loss.detach())
    assert torch.allclose(losses[0], losses[1], atol=1e-6)
    for (name, p), q in zip(lora_parameters(plain).items(), lora_parameters(patched).values()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6), name


def test_lora_on_llava_next_patched_through_the_wrapper():
    """LLaVA-NeXT's adapter reads `model.model.image_newline`, which a PeftModel's `.model` does not have."""
    from tiny_models import IMAGE_TOKEN_ID, pad

    torch.manual_seed(0)
    model = peft.get_peft_model(tiny_llava_next().train(), lora_config())
    apply_pyramid_drop(model, PDROP)
    image_sizes, pixel_values = torch.tensor([[56, 56]]), torch.randn(1, 5, 3, 28, 28)
    with torch.no_grad():
        features = model.get_base_model().model.get_image_features(pixel_values=pixel_values, image_sizes=image_sizes)
    count = len(features.pooler_output[0])
    input_ids, attention_mask = pad([[1, 7] + [IMAGE_TOKEN_ID] * count + [9, 10, 11]])
    labels = torch.full_like(input_ids, -100)
    labels[:, -2:] = input_ids[:, -2:]
    batch = dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, image_sizes=image_sizes)
    model(**batch, labels=labels).loss.backward()
    record = get_drop_record(model)
    visual = record.num_visual_tokens[0]
    assert record.num_layout_tokens[0] > 0  # the row newlines are found (and kept)
    assert [len(kept) for kept in record.kept_visual_indices[0]] == [visual, visual // 2, visual // 4]


def test_adapter_and_base_config_keep_the_schedule(tmp_path):
    """`save_pretrained` of a PeftModel writes only the adapter; the schedule travels in the base model's config."""
    from transformers import AutoConfig, LlavaForConditionalGeneration

    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    tiny_llava().save_pretrained(base_dir)  # the base checkpoint, as a hub model would be: no schedule
    model = apply_pyramid_drop(
        peft.get_peft_model(LlavaForConditionalGeneration.from_pretrained(base_dir), lora_config()), PDROP
    )
    model.save_pretrained(adapter_dir)
    model.get_base_model().config.save_pretrained(adapter_dir)  # config.json beside the adapter: the schedule
    assert "pyramid_drop" not in (base_dir / "config.json").read_text()

    config = AutoConfig.from_pretrained(adapter_dir)
    base = LlavaForConditionalGeneration.from_pretrained(base_dir, config=config)
    loaded = peft.PeftModel.from_pretrained(base, adapter_dir)
    apply_pyramid_drop(loaded)  # no config: the saved one
    assert loaded.get_base_model().config.pyramid_drop == PDROP.to_dict()
    model.eval()
    loaded.eval()
    batch, _ = multi_turn_batch()
    with torch.no_grad():
        expected, got = model(**batch).logits, loaded(**batch).logits
    assert torch.allclose(expected, got, atol=1e-5)
    assert [len(k) for k in get_drop_record(loaded).kept_visual_indices[0]] == [64, 32, 16]


@pytest.mark.parametrize("order", ["apply_first", "wrap_first"])
def test_merge_and_unload_keeps_pyramid_drop(order):
    model = lora_model(PDROP, order).eval()
    batch, _ = multi_turn_batch()
    with torch.no_grad():
        before = model(**batch).logits
        merged = model.merge_and_unload()
        assert not isinstance(merged, peft.PeftModel) and is_pyramid_drop_applied(merged)
        after = merged(**batch).logits  # same drops and the LoRA update now inside the weights
    assert torch.allclose(before, after, atol=1e-5)
    assert [len(k) for k in get_drop_record(merged).kept_visual_indices[0]] == [64, 32, 16]


def test_remove_restores_the_exact_lora_model():
    batch, _ = multi_turn_batch()
    plain = lora_model().eval()
    model = lora_model(PDROP, "wrap_first").eval()
    with torch.no_grad():
        dropped = model(**batch).logits
        remove_pyramid_drop(model)
        assert not is_pyramid_drop_applied(model) and "pyramid_drop" not in model.get_base_model().config.to_dict()
        restored, expected = model(**batch).logits, plain(**batch).logits
    assert dropped.shape[1] < expected.shape[1]
    assert torch.equal(restored, expected)
