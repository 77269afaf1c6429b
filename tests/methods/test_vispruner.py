"""`method="vispruner"` is VisPruner as released (Theia-4869/VisPruner): the oracle below transcribes its selection.

Transcribed: `LlavaMetaForCausalLM.encode_images` in `llava/model/llava_arch.py` and `CLIPVisionTower.feature_select`
in `llava/model/multimodal_encoder/clip_encoder.py`, at the authors' commit aefa01ad (2025-07-01), with the release's
`--important_ratio` default 0.5. The release runs it on the tower's `hidden_states[-2]` and `attentions[-2]` (eager
attention maps) of each image, CLS left out; here one image per call (B = 1), as its evaluation scripts do.
"""

import pytest
import torch
from generation_checks import assert_rows_equal_alone
from tiny_models import IMAGE_TOKEN_ID, llava_batch, sample, text_fields, tiny_llava, tiny_llava_next, vision_fields
from transformers import LlavaConfig, LlavaForConditionalGeneration, SiglipVisionConfig

from pyramiddrop import PyramidDropConfig, apply_pyramid_drop, get_drop_record

PROMPTS = [(3, 1, 6), (1, 1, 4), (5, 1, 3), (2, 0, 4)]  # one image or none per sample
NUM_VISUAL = 64


def released_vispruner(image_features, image_attentions, visual_token_num, important_ratio=0.5, fix_odd=False):
    """`encode_images` from the release, up to its `index_masks` (`image_features`: [B, N, C] tower features,
    `image_attentions`: [B, H, N] CLS rows). `fix_odd` widens one index to the even half's length (the release's
    `R // 2 - r` fails when the list has odd length)."""
    B, N, C = image_features.shape  # noqa: N806 (the release's names)
    device = image_features.device
    important_token_num = int(visual_token_num * important_ratio)
    diverse_token_num = visual_token_num - important_token_num
    image_attentions = image_attentions.mean(dim=1)
    token_indices = image_attentions.argsort(dim=-1, descending=True)
    important_indices = token_indices[:, :important_token_num]
    residual_indices = token_indices[:, important_token_num:]
    image_normalized = image_features / image_features.norm(dim=-1, keepdim=True)
    while diverse_token_num > 0:
        R = residual_indices.shape[1]  # noqa: N806
        r = min(8, R - diverse_token_num)
        if r <= 0:
            break
        residual_tokens = image_normalized[torch.arange(B).unsqueeze(-1).expand(-1, R), residual_indices]
        a, b = residual_tokens[..., ::2, :], residual_tokens[..., 1::2, :]
        scores = a @ b.transpose(-1, -2)
        scores = scores.max(dim=-1).values
        distinct_indices = scores.argsort(dim=-1, descending=True)[:, r:]
        width = distinct_indices.shape[1] if fix_odd else R // 2 - r
        residual_indices = torch.cat(
            [
                residual_indices[..., ::2][torch.arange(B).unsqueeze(-1).expand(-1, width), distinct_indices],
                residual_indices[..., 1::2],
            ],
            dim=-1,
        )
    if diverse_token_num > 0:
        selected_indices = torch.cat([important_indices, residual_indices], dim=-1)
    else:
        selected_indices = important_indices
    index_masks = torch.zeros(B, N, dtype=torch.bool, device=device)
    index_masks.scatter_(1, selected_indices, True)
    return index_masks


def _model(seed=0, attn="sdpa", text_only_output=False):
    """A tiny LLaVA-1.5 whose vision tower has larger random weights (a peaked CLS row, distinct features)."""
    model = tiny_llava(attn, seed=seed, text_only_output=text_only_output)
    generator = torch.Generator().manual_seed(seed + 10)
    with torch.no_grad():
        for parameter in model.model.vision_tower.parameters():
            if parameter.dim() == 2:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return model


def _release_inputs(model, pixel_values):
    """What the release's `CLIPVisionTower.forward(images, output_attentions=True)` returns: patch features of
    `hidden_states[-2]` and the CLS rows of `attentions[-2]` (eager maps)."""
    tower = model.model.vision_tower
    implementation = tower.config._attn_implementation
    tower.set_attn_implementation("eager")
    with torch.no_grad():
        out = tower(pixel_values, output_hidden_states=True, output_attentions=True)
    tower.set_attn_implementation(implementation)
    return out.hidden_states[-2][:, 1:], out.attentions[-2][:, :, 0, 1:]


def _release_kept(model, batch, keep, **options):
    features, attentions = _release_inputs(model, batch["pixel_values"])
    kept = []
    for image in range(features.shape[0]):
        mask = released_vispruner(features[image : image + 1], attentions[image : image + 1], keep, **options)
        kept.append(mask[0].nonzero().flatten().tolist())
    return kept


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("keep", [16, 24, 32, 48])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_vispruner_keeps_the_release_selection(seed, keep, attn):
    model = _model(seed, attn)
    batch = llava_batch(PROMPTS, seed=seed)
    expected = _release_kept(model, batch, keep)
    ratio = (keep + 0.5) / NUM_VISUAL  # int(64 * ratio) == keep
    apply_pyramid_drop(model, PyramidDropConfig([0], [ratio], method="vispruner"))
    with torch.no_grad():
        model(**batch)
    record = get_drop_record(model)
    image = 0
    for row, (_, images, _) in enumerate(PROMPTS):
        if images:
            assert record.kept_visual_indices[row][1].tolist() == expected[image]
            image += 1


@pytest.mark.parametrize("keep", [10, 13])
def test_an_odd_residual_list_keeps_the_release_selection_with_its_index_widened(keep):
    """keep 10 leaves 59 residual tokens: an odd list, where the release's `R // 2 - r` index raises; with that index
    widened to the even half's length (the evident intent) it keeps what `vispruner` keeps (keep 13: an even list,
    the index unchanged)."""
    model = _model(1)
    batch = llava_batch(PROMPTS[:1], seed=1)
    features, attentions = _release_inputs(model, batch["pixel_values"])
    if keep == 10:
        with pytest.raises(IndexError, match="shape mismatch"):
            released_vispruner(features, attentions, keep)
    expected = _release_kept(model, batch, keep, fix_odd=True)
    apply_pyramid_drop(model, PyramidDropConfig([0], [(keep + 0.5) / NUM_VISUAL], method="vispruner"))
    with torch.no_grad():
        model(**batch)
    assert get_drop_record(model).kept_visual_indices[0][1].tolist() == expected[0]


def test_the_selection_differs_from_the_cls_top_k_and_from_the_projected_features():
    """The oracle comparison can fail: VisPruner keeps other tokens than VisionZip's top-k of the same CLS row, and
    its matching on the projector's output (the language model's input) would keep yet others."""
    model = _model(2)
    batch = llava_batch(PROMPTS[:1], seed=2)
    features, attentions = _release_inputs(model, batch["pixel_values"])
    expected = _release_kept(model, batch, 16)[0]
    top = attentions.mean(dim=1)[0].topk(16).indices.sort().values.tolist()
    with torch.no_grad():
        projected = model.model.multi_modal_projector(features)
    on_projected = released_vispruner(projected, attentions, 16)[0].nonzero().flatten().tolist()
    assert expected != top and expected != on_projected


@pytest.mark.parametrize("seed", range(2))
def test_padded_batch_equals_each_row_alone(seed):
    model = apply_pyramid_drop(_model(seed, text_only_output=True), PyramidDropConfig([0], [0.3], method="vispruner"))
    batch = llava_batch(PROMPTS, seed=seed)
    samples = [sample(batch, row) for row in range(len(PROMPTS))]
    assert_rows_equal_alone(model, batch, samples, steps=4, tol=1e-4)


def test_several_images_in_a_sample_are_refused():
    model = apply_pyramid_drop(_model(), PyramidDropConfig([0], [0.25], method="vispruner"))
    message = r"method 'vispruner' selects within one image .* 128 image tokens, more"
    with pytest.raises(ValueError, match=message), torch.no_grad():
        model(**llava_batch([(2, 2, 3)]))


@pytest.mark.parametrize(
    "fields,message",
    [
        (dict(layer_list=[2], image_token_ratio_list=[0.25]), r"drops once, before the language model.*\[2\]"),
        (dict(position_mode="original"), r"renumbers the kept tokens' positions .* position_mode='compact'"),
        (dict(conversation="rerank"), r"selects once, from the first prompt.* conversation='keep'"),
    ],
)
def test_settings_the_release_has_no_counterpart_for_are_refused(fields, message):
    config = dict(layer_list=[0], image_token_ratio_list=[0.25], method="vispruner") | fields
    with pytest.raises(ValueError, match=f"method 'vispruner' {message}"):
        PyramidDropConfig(**config)


def test_towers_the_release_does_not_read_are_refused_at_apply_time():
    config = PyramidDropConfig([0], [0.25], method="vispruner")
    with pytest.raises(ValueError, match=r"method 'vispruner' ranks by the vision tower's attention .* LLaVA-NeXT"):
        apply_pyramid_drop(tiny_llava_next(), config)
    full = tiny_llava()
    full.config.vision_feature_select_strategy = "full"
    with pytest.raises(ValueError, match=r"'vispruner' ranks the patch tokens by the CLS row.*strategy='default'"):
        apply_pyramid_drop(full, config)
    deepest = tiny_llava()
    deepest.config.vision_feature_layer = 1
    with pytest.raises(ValueError, match=r"one negative vision_feature_layer .* got vision_feature_layer=1"):
        apply_pyramid_drop(deepest, config)
    siglip = LlavaConfig(
        vision_config=SiglipVisionConfig(**vision_fields(56, num_layers=2)),
        text_config=text_fields(),
        image_token_id=IMAGE_TOKEN_ID,
        vision_feature_select_strategy="full",
    )
    with pytest.raises(ValueError, match=r"'vispruner' ranks by the attention of the vision tower's CLS .* no CLS"):
        apply_pyramid_drop(LlavaForConditionalGeneration(siglip), config)


@pytest.mark.parametrize(
    "method,fields",
    [("vispruner", {}), ("conditional-dpp", {"query": "instruction_mean"})],
)
def test_budget_schedules_and_eval_baselines_drop_once_before_layer_0(method, fields):
    """At a budget, and as `pdrop eval --baselines` at λ's budget: one drop before layer 0, compact positions (the
    releases rebuild the input), whatever the λ rows' schedule."""
    import argparse

    from pyramiddrop.budget import average_visual_fraction, schedule_for
    from pyramiddrop.cli.evaluate import eval_settings

    config = schedule_for(method, 1 / 3, 8, 144)
    assert (config.method, config.layer_list, config.position_mode) == (method, [0], "compact")
    assert all(getattr(config, key) == value for key, value in fields.items())
    assert average_visual_fraction(config, 8, 144) == pytest.approx(1 / 3, rel=0.02)
    args = argparse.Namespace(
        noise_control=False, schedule=None, layer_list=None, fastv_layer=None, budget=None, lam=[0.5], stages=4,
        position_mode=["original"], baselines=[method], methods=["pdrop"],
    )  # fmt: skip
    row = eval_settings(args, 8, 144)[-1]
    assert (row.method, row.config.layer_list, row.config.position_mode) == (method, [0], "compact")
    pdrop = eval_settings(argparse.Namespace(**{**vars(args), "baselines": []}), 8, 144)[-1].config
    budget = average_visual_fraction(pdrop, 8, 144)
    assert average_visual_fraction(row.config, 8, 144) == pytest.approx(budget, rel=0.02)
