"""Selection before the first decoder layer (`layer_list=[0]`), DivPrune, VisionZip and pooling.

References are computed without the engine: the unpatched language model run on the kept (or pooled)
embeddings, DivPrune's greedy max-min written out plainly, and the vision tower's own attention maps from
`output_attentions=True`.
"""

import pytest
import torch
from generation_checks import assert_cached_equals_recompute, replay_scorer
from tiny_models import (
    IMAGE_TOKEN_ID,
    collate,
    llava_batch,
    qwen_sample,
    qwen_samples,
    sample,
    tiny_llava,
    tiny_llava_next,
    tiny_qwen2_vl,
)

from pyramiddrop import PyramidDropConfig, apply_pyramid_drop, get_drop_record, remove_pyramid_drop
from pyramiddrop.budget import average_visual_fraction, schedule_for
from pyramiddrop.flops import prefill_flops, tokens_per_layer

PROMPTS = [(3, 1, 6), (1, 1, 2), (5, 2, 4)]  # the third sample has two images (one pool of 128 tokens)
SIDE = 8  # tiny_llava: 64 visual tokens per image, an 8x8 patch grid
_REPLAY = ("replay_for_prellm_tests", replay_scorer("replay_for_prellm_tests"))


def image_embeddings(model, batch):
    """The language model's input embeddings with the projected image features in place (what layer 0 gets)."""
    with torch.no_grad():
        embeds = model.get_input_embeddings()(batch["input_ids"])
        features = model.model.get_image_features(
            pixel_values=batch["pixel_values"],
            vision_feature_layer=model.config.vision_feature_layer,
            vision_feature_select_strategy=model.config.vision_feature_select_strategy,
        ).pooler_output
        mask = (batch["input_ids"] == IMAGE_TOKEN_ID)[..., None].expand_as(embeds)
        return embeds.masked_scatter(mask, torch.cat(features).to(embeds.dtype))


def last_logits_on(model, embeds, positions):
    with torch.no_grad():
        hidden = model.model.language_model(inputs_embeds=embeds, position_ids=positions).last_hidden_state
        return model.lm_head(hidden[:, -1])


def pooled(embeds, ids, kernel):
    """Every image's 2-D grid averaged in kh x kw blocks, the mean placed at the block's top-left token."""
    kh, kw = kernel
    embeds, keep = embeds.clone(), torch.zeros(ids.shape, dtype=torch.bool)
    visual = torch.nonzero(ids[0] == IMAGE_TOKEN_ID).flatten()
    for start in range(0, len(visual), SIDE * SIDE):
        where = visual[start : start + SIDE * SIDE].view(SIDE, SIDE)
        grid = embeds[0, where.flatten()].view(SIDE // kh, kh, SIDE // kw, kw, -1)
        embeds[0, where[::kh, ::kw].flatten()] = grid.mean(dim=(1, 3)).flatten(0, 1)
        keep[0, where[::kh, ::kw].flatten()] = True
    keep[0, ids[0] != IMAGE_TOKEN_ID] = True
    return embeds, keep


@pytest.mark.parametrize("method", ["pdrop", "divprune", "visionzip", "random", "pool"])
@pytest.mark.parametrize("position_mode", ["compact", "original"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_a_drop_before_layer_0_is_the_unpatched_model_on_the_kept_tokens(method, position_mode, attn):
    model = tiny_llava(attn, kv_heads=2)
    batch = sample(llava_batch(PROMPTS), 2)  # two images
    config = PyramidDropConfig(
        layer_list=[0], image_token_ratio_list=[0.25], method=method, position_mode=position_mode
    )
    apply_pyramid_drop(model, config)
    with torch.no_grad():
        logits = model(**batch).logits[:, -1]
    record = get_drop_record(model)
    assert [len(kept) for kept in record.kept_visual_indices[0]] == [128, 32]
    assert record.visual_tokens_per_layer[0].tolist() == [32] * 6  # no layer sees the dropped tokens
    remove_pyramid_drop(model)

    embeds = image_embeddings(model, batch)
    if method == "pool":
        embeds, keep = pooled(embeds, batch["input_ids"], (2, 2))
        assert torch.equal(torch.nonzero(keep[0]).flatten(), record.kept_positions[0])
    kept = record.kept_positions[0]
    positions = kept[None] if position_mode == "original" else torch.arange(len(kept))[None]
    reference = last_logits_on(model, embeds[:, kept], positions)
    assert (logits - reference).abs().max().item() < 1e-4


def divprune_reference(features: torch.Tensor, keep: int) -> list[int]:
    """DivPrune (arXiv 2503.02175, Alg. 1) as written: cosine distances; start with the most isolated token."""
    normed = features / features.norm(dim=-1, keepdim=True)
    distance = 1 - normed @ normed.T
    count = len(features)
    nearest = [min(distance[i, j].item() for j in range(count) if j != i) for i in range(count)]
    chosen = [max(range(count), key=lambda i: nearest[i])]
    while len(chosen) < keep:
        rest = [i for i in range(count) if i not in chosen]
        chosen.append(max(rest, key=lambda i: distance[i, chosen].min().item()))
    return sorted(chosen)


@pytest.mark.parametrize("ratio", [0.3, 0.75])  # at 0.75 the 64-token pools run out before the 128-token one
def test_divprune_keeps_the_greedy_max_min_set_of_each_sample(ratio):
    model = tiny_llava(kv_heads=2)
    batch = llava_batch(PROMPTS)
    embeds = image_embeddings(model, batch)
    apply_pyramid_drop(model, PyramidDropConfig(layer_list=[0], image_token_ratio_list=[ratio], method="divprune"))
    with torch.no_grad():
        model(**batch)
    record = get_drop_record(model)
    for row in range(len(PROMPTS)):
        features = embeds[row][batch["input_ids"][row] == IMAGE_TOKEN_ID]
        keep = int(len(features) * ratio)
        assert record.kept_visual_indices[row][1].tolist() == divprune_reference(features, keep)


def test_divprune_scores_stay_put_when_a_small_group_runs_out_first():
    """Groups run the greedy for the largest keep; a group with every token picked must keep its order."""
    from pyramiddrop.scoring import RankInputs, divprune_scores

    torch.manual_seed(0)
    hidden = torch.randn(2, 8, 16)
    hidden[0, 0] = -hidden[0, 1:3].sum(0)  # group 0: token 0 lies apart from tokens 1, 2, so it is picked first
    group = torch.tensor([[0, 0, 0, -1, -1, -1, -1, -1], [1] * 8])
    visual_index = torch.where(group >= 0, torch.arange(8).expand(2, -1), -1)
    inputs = RankInputs(
        hidden_states=hidden, layer=None, position_embeddings=None, attention_mask=torch.ones(2, 8, dtype=torch.bool),
        query_mask=torch.zeros(2, 8, dtype=torch.bool), visual_index=visual_index, stage=1, group_index=group,
        keep=torch.tensor([2, 6]),
    )  # fmt: skip
    scores = divprune_scores(inputs)
    for row, (length, keep) in enumerate([(3, 2), (8, 6)]):
        top = scores[row, :length].topk(keep).indices.sort().values.tolist()
        assert top == divprune_reference(hidden[row, :length], keep)


def test_visionzip_keeps_the_patches_the_cls_token_attends_to_most():
    model = tiny_llava(kv_heads=2)
    model.model.vision_tower.set_attn_implementation("eager")
    batch = llava_batch(PROMPTS)
    with torch.no_grad():
        maps = model.model.vision_tower(batch["pixel_values"], output_attentions=True).attentions
    # LLaVA's feature layer -2 is the output of vision layer 0 (of 2); CLS row, mean over heads, patches only.
    cls_attention = maps[0][:, :, 0, 1:].mean(dim=1)
    apply_pyramid_drop(model, PyramidDropConfig(layer_list=[0], image_token_ratio_list=[0.25], method="visionzip"))
    model.model.vision_tower.set_attn_implementation("sdpa")  # the capture recomputes; any backend
    with torch.no_grad():
        model(**batch)
    record = get_drop_record(model)
    image = 0
    for row, (_, images, _) in enumerate(PROMPTS):
        scores = cls_attention[image : image + images].flatten()
        image += images
        expected = scores.topk(int(len(scores) * 0.25)).indices.sort().values
        assert record.kept_visual_indices[row][1].tolist() == expected.tolist()


@pytest.mark.parametrize("method", ["divprune", "visionzip", "pool"])
def test_pre_llm_batch_equals_samples_alone_in_generate(method):
    model = apply_pyramid_drop(
        tiny_llava(kv_heads=2), PyramidDropConfig(layer_list=[0], image_token_ratio_list=[0.25], method=method)
    )
    batch = llava_batch(PROMPTS)
    options = dict(
        max_new_tokens=6, min_new_tokens=6, do_sample=False, return_dict_in_generate=True, output_logits=True
    )
    with torch.no_grad():
        out = model.generate(**batch, **options)
    batch_record = get_drop_record(model)
    for index in range(len(PROMPTS)):
        alone = sample(batch, index)
        with torch.no_grad():
            single = model.generate(**alone, **options)
        assert single.sequences[0, -6:].tolist() == out.sequences[index, -6:].tolist()
        for step in range(6):
            assert (single.logits[step][0] - out.logits[step][index]).abs().max().item() < 1e-4
        assert torch.equal(get_drop_record(model).kept_visual_indices[0][1], batch_record.kept_visual_indices[index][1])


def test_pooling_passes_the_gradient_to_every_token_of_a_block():
    model = tiny_llava(kv_heads=2).train()
    batch = sample(llava_batch(PROMPTS), 0)
    labels = batch["input_ids"].clone()
    labels[:, :-3] = -100
    grads = {}
    projector = model.model.multi_modal_projector

    def keep_gradient(module, args, output):
        output.register_hook(lambda grad: grads.update(features=grad))

    projector.register_forward_hook(keep_gradient)
    for method in ("pool", "divprune"):
        apply_pyramid_drop(model, PyramidDropConfig(layer_list=[0], image_token_ratio_list=[0.25], method=method))
        model(**batch, labels=labels).loss.backward()
        reached = grads["features"][0].abs().sum(-1) > 0
        assert int(reached.sum()) == (64 if method == "pool" else 16), method
        model.zero_grad()


def test_pool_refuses_what_is_no_pooling():
    with pytest.raises(ValueError, match=r"method 'pool' averages patch blocks .* give one drop"):
        PyramidDropConfig(layer_list=[0, 2], image_token_ratio_list=[0.25, 0.0625], method="pool")
    model = apply_pyramid_drop(
        tiny_llava(), PyramidDropConfig(layer_list=[0], image_token_ratio_list=[1 / 9], method="pool")
    )
    with pytest.raises(ValueError, match=r"keeping 7 of 64 visual tokens, an image of 64 tokens has no such pooling"):
        model(**llava_batch(PROMPTS[:1]))


def test_visionzip_is_refused_at_apply_time_where_patches_are_not_tokens():
    with pytest.raises(ValueError, match=r"method 'visionzip' ranks by the vision tower's attention .* LLaVA-NeXT"):
        apply_pyramid_drop(
            tiny_llava_next(), PyramidDropConfig(layer_list=[0], image_token_ratio_list=[0.25], method="visionzip")
        )


def test_pre_llm_schedules_and_flops():
    divprune = schedule_for("divprune", 1 / 3, 8, 144)
    assert divprune.layer_list == [0] and average_visual_fraction(divprune, 8, 144) == pytest.approx(1 / 3, rel=0.02)
    assert tokens_per_layer(8, 144, divprune) == [48] * 8
    pool = schedule_for("pool", 1 / 3, 8, 144)  # a 3x1 kernel on the 12x12 grid keeps exactly a third
    assert tokens_per_layer(8, 144, pool) == [48] * 8
    assert tokens_per_layer(8, 144, schedule_for("pool", 0.131, 8, 144)) == [18] * 8  # 4x2 is the nearest (1/8)
    # End to end: the layers on 10 + 48 tokens, DivPrune's distance matrix over all 144, the LM head.
    model = tiny_llava()
    layers = 6 * (2 * 58 * 64 * 64 * 2 + 2 * 58 * 58 * 64 + 3 * 58 * 64 * 128)  # q/o + k/v (MHA), attention, MLP
    expected = layers + 144 * 144 * 64 + 64 * model.config.text_config.vocab_size
    assert prefill_flops(model.config, 10, 144, divprune) == expected


def test_pre_llm_drop_on_qwen2_vl_video_frames_and_cached_decoding():
    """M-RoPE positions and per-frame pools: divprune before layer 0 (then pdrop-style drop after layer 2)."""
    model = tiny_qwen2_vl()
    sample = qwen_sample([2, ("image", 8, 8), 1, ("video", 4, 8, 8), 2], seed=2)
    for method in ("divprune", "pool"):
        config = PyramidDropConfig([0], [0.25], method=method, position_mode="original", video_pool="frame")
        apply_pyramid_drop(model, config)
        with torch.no_grad():
            model(**collate([sample]))
        record = get_drop_record(model)
        frames = record.visual_frame_index[0][record.kept_visual_indices[0][1]]
        assert [int((frames == frame).sum()) for frame in [-1, 0, 1, 2, 3]] == [4] * 5, method  # 16 tokens each
    pooled_across_frames = PyramidDropConfig([0], [0.25], method="pool", position_mode="original")
    apply_pyramid_drop(model, pooled_across_frames)
    with pytest.raises(ValueError, match="method 'pool' pools each video frame's grid: use video_pool='frame'"):
        model(**collate([sample]))
    config = PyramidDropConfig([0, 2], [0.5, 0.25], method="divprune", position_mode="original")
    batch = collate(qwen_samples("qwen2_vl"))
    assert_cached_equals_recompute(tiny_qwen2_vl(), batch, config, _REPLAY, steps=6, tol=3e-5)  # as the Qwen tests
