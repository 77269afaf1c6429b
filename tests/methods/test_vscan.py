"""`method="vscan"` is VScan as released (Tencent/SelfEvolvingAgent, `VScan/`, commit 5fe6480): the oracle below
transcribes its selection plainly, on tiny LLaVA-1.5 models with the release's 24 x 24 patch grid.

Transcribed from `VScan/llava/model/llava_arch.py` (`LlavaMetaForCausalLM.encode_images`, `window_cls_selection`,
`token_merging`) and `VScan/llava/model/modeling_llama_x.py` (`LlamaModel.layer_prune`, inference branch), batch 1,
one image. The release's tower returns every layer's attention (`output_attentions=True`, eager) and the features of
`hidden_states[-2]`; the merged features go into the language model without the dropped ones, positions 0..L-1.
"""

import copy
import math

import pytest
import torch
from generation_checks import assert_rows_equal_alone, greedy
from tiny_models import IMAGE_TOKEN_ID, _finish, llava_batch, sample, text_fields, vision_fields
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from pyramiddrop import PyramidDropConfig, apply_pyramid_drop, get_drop_record

SIDE, PIXELS = 24, 168  # 168 px / 7 px patches: the release's 24 x 24 grid (576 tokens)
NUM_VISUAL = SIDE * SIDE
PROMPTS = [(3, 1, 6), (1, 1, 4), (5, 1, 3)]


def tiny_vscan_llava(attn: str = "sdpa", seed: int = 0, vision_layers: int = 8, pixels: int = PIXELS, text_only=False):
    """A tiny LLaVA-1.5 whose tower has layers 5 and -2 and peaked random attention."""
    torch.manual_seed(seed)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**vision_fields(pixels, num_layers=vision_layers)),
        text_config=LlamaConfig(**text_fields(6, 2)),
        image_token_id=IMAGE_TOKEN_ID,
        projector_hidden_act="gelu",
    )
    model = LlavaForConditionalGeneration(config)
    generator = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "vision_tower" in name and ("q_proj.weight" in name or "k_proj.weight" in name):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    return _finish(model, attn, text_only_output=text_only)


def vscan_batch(prompts, seed: int = 0, padding: str = "left", pixels: int = PIXELS) -> dict:
    side = pixels // 7
    batch = llava_batch(prompts, num_visual=side * side, seed=seed, padding=padding)
    images = sum(images for _, images, _ in prompts)
    if images:
        batch["pixel_values"] = torch.randn(images, 3, pixels, pixels, generator=torch.Generator().manual_seed(seed))
    return batch


def window_cls_selection(image_attentions, visual_token_num, window_size=6):
    """The release's, its 24 x 24 grid read from the input."""
    B, N = image_attentions.shape  # noqa: N806
    H = W = math.isqrt(N)  # noqa: N806 (the release: assert N == 24 * 24; H = W = 24)
    attn_map = image_attentions.view(B, H, W)
    num_windows_h = H // window_size
    num_windows_w = W // window_size
    total_windows = num_windows_h * num_windows_w
    k = visual_token_num // total_windows
    token_indices = []
    for b in range(B):
        indices_b = []
        for i in range(num_windows_h):
            for j in range(num_windows_w):
                window = attn_map[b, i * window_size : (i + 1) * window_size, j * window_size : (j + 1) * window_size]
                window_flat = window.reshape(-1)
                topk_values, topk_indices = torch.topk(window_flat, k)
                for idx in topk_indices:
                    dy, dx = divmod(idx.item(), window_size)
                    global_y = i * window_size + dy
                    global_x = j * window_size + dx
                    global_index = global_y * W + global_x
                    indices_b.append(global_index)
        token_indices.append(indices_b)
    return torch.tensor(token_indices, device=image_attentions.device)


def token_merging(image_features, index_mask, scaling=1):
    """The release's."""
    B, N, D = image_features.shape  # noqa: N806
    T = index_mask.sum(dim=1)  # noqa: N806
    retained_tokens = []
    non_retained_tokens = []
    for b in range(B):
        retained_tokens.append(image_features[b][index_mask[b]])
        non_retained_tokens.append(image_features[b][~index_mask[b]])
    retained_tokens = torch.stack(retained_tokens, dim=0)
    non_retained_tokens = torch.stack(non_retained_tokens, dim=0)
    if non_retained_tokens.shape[1] == 0:
        return image_features
    cosine_sim = torch.nn.functional.cosine_similarity(
        non_retained_tokens.unsqueeze(2), retained_tokens.unsqueeze(1), dim=3
    )
    nearest_token_indices = cosine_sim.argmax(dim=2)
    merge_count = torch.zeros(B, T[0], device=image_features.device, dtype=torch.int)
    merged_features = torch.zeros_like(retained_tokens)
    merged_features += retained_tokens * scaling
    expanded_indices = nearest_token_indices
    merged_features.scatter_add_(1, nearest_token_indices.unsqueeze(-1).expand(-1, -1, D), non_retained_tokens)
    merge_count.scatter_add_(1, expanded_indices, torch.ones_like(expanded_indices, dtype=merge_count.dtype))
    merged_features /= scaling + merge_count.unsqueeze(2)
    for b in range(B):
        image_features[b, index_mask[b]] = merged_features[b]
    return image_features


def encode_images(model, images, visual_token_num):
    """The release's `encode_images` on HF LLaVA's tower and projector: (features, index_mask)."""
    out = model.model.vision_tower(images, output_attentions=True, output_hidden_states=True)
    image_features = out.hidden_states[-2][:, 1:]  # feature_select: select_layer -2, 'patch'
    image_attentions = torch.stack(out.attentions, dim=0)[:, :, :, 0, 1:]
    image_attentions = image_attentions.mean(dim=2)
    B, N = image_features.shape[:2]  # noqa: N806
    image_attentions_shallow = image_attentions[5]
    image_attentions_deep = image_attentions[-2]
    global_ratio = 0.5
    local_ratio = 1 - global_ratio
    local_indices = window_cls_selection(image_attentions_shallow, int(visual_token_num * local_ratio), window_size=6)
    for b in range(B):
        image_attentions_deep[b, local_indices[b]] = 0
    global_indices = torch.topk(image_attentions_deep, k=visual_token_num - int(visual_token_num * local_ratio), dim=1)[
        1
    ]
    token_indices = torch.cat((local_indices, global_indices), dim=1)
    index_mask = torch.zeros(B, N, dtype=torch.bool, device=image_features.device)
    index_mask.scatter_(1, token_indices, True)
    image_features = model.model.multi_modal_projector(image_features)
    image_features = token_merging(image_features, index_mask, scaling=1)
    return image_features, index_mask


def layer_prune(model, features, image_index, image_tokens, keep_length, rank_layer):
    """The release's inference branch for one sample (the input of layer `rank_layer`, positions 0..L-1):
    kept indices among the image tokens."""
    language_model = model.model.language_model
    layer = language_model.layers[rank_layer]
    self_attn = layer.self_attn
    hidden_states = layer.input_layernorm(features)
    bsz, q_len, _ = hidden_states.size()
    head_dim = self_attn.head_dim
    num_heads = model.config.text_config.num_attention_heads
    num_key_value_heads = model.config.text_config.num_key_value_heads
    query_states = self_attn.q_proj(hidden_states).view(bsz, q_len, num_heads, head_dim).transpose(1, 2)
    key_states = self_attn.k_proj(hidden_states).view(bsz, q_len, num_key_value_heads, head_dim).transpose(1, 2)
    position_ids = torch.arange(q_len)[None]
    cos, sin = language_model.rotary_emb(hidden_states, position_ids)

    def rotate_half(x):
        x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
        return torch.cat((-x2, x1), dim=-1)

    query_states = query_states * cos[:, None] + rotate_half(query_states) * sin[:, None]
    key_states = key_states * cos[:, None] + rotate_half(key_states) * sin[:, None]
    key_states = key_states.repeat_interleave(num_heads // num_key_value_heads, dim=1)  # repeat_kv
    cur_key_states, cur_query_states = key_states[0], query_states[0]
    text_query_states = cur_query_states[:, q_len - 1, :].unsqueeze(1)  # prompt_total_len - 1: the last token
    attn_weights = torch.matmul(text_query_states, cur_key_states.transpose(1, 2)) / math.sqrt(head_dim)
    attn_weights = torch.nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32)  # the last row sees all
    attention_avg_head = torch.mean(attn_weights, dim=0)
    attention_avg_head = attention_avg_head[:, image_index : image_index + image_tokens]
    attention_avg_text = torch.mean(attention_avg_head, dim=0)
    return attention_avg_text.topk(keep_length).indices.sort().values


def released_vscan(model, single: dict, visual_token_num: int, rank_layer: int | None, keep_length: int):
    """The release on one sample with one image: encoder-kept patches, their merged features, and the patches kept
    after the drop at `rank_layer` (None: no drop in the language model)."""
    with torch.no_grad():
        features, index_mask = encode_images(model, single["pixel_values"], visual_token_num)
        kept = index_mask[0].nonzero().flatten()
        kept_features = features[0][index_mask[0]]
        ids = single["input_ids"][0]
        image_index = int((ids == IMAGE_TOKEN_ID).nonzero()[0])
        embed = model.get_input_embeddings()
        embeds = torch.cat([embed(ids[:image_index]), kept_features, embed(ids[image_index + index_mask.shape[1] :])])[
            None
        ]
        if rank_layer is None:
            return kept, kept_features, None
        out = model.model.language_model(inputs_embeds=embeds, output_hidden_states=True)
        top = layer_prune(model, out.hidden_states[rank_layer], image_index, len(kept), keep_length, rank_layer)
    return kept, kept_features, kept[top]


def vscan(kept: int, llm_layer: int | None = 3, llm_kept: int | None = None, num_visual: int = NUM_VISUAL):
    """VScan keeping exactly `kept` patches before the LLM and `llm_kept` after layer `llm_layer`."""
    if llm_layer is None:
        return PyramidDropConfig([0], [(kept + 0.5) / num_visual], method="vscan")
    return PyramidDropConfig([0, llm_layer], [(kept + 0.5) / num_visual, (llm_kept + 0.5) / num_visual], method="vscan")


def run(model, config, batch):
    """Apply `config` to a copy, one forward; per row the kept patches per stage and the merged image features
    entering layer 0."""
    model = apply_pyramid_drop(copy.deepcopy(model), config)
    entering = []
    language_model = model.model.language_model
    handle = language_model.layers[0].register_forward_pre_hook(
        lambda module, args, kwargs: entering.append((args[0] if args else kwargs["hidden_states"]).clone()),
        with_kwargs=True,
    )
    with torch.no_grad():
        model(**batch)
    handle.remove()
    return get_drop_record(model), entering[0]


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("kept,llm_layer,llm_kept", [(96, 3, 32), (64, 2, 20), (192, 4, 64), (128, 1, 7)])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_vscan_keeps_and_merges_what_released_vscan_does(seed, kept, llm_layer, llm_kept, attn):
    """Every row of a padded batch: the release's patches before the LLM, its merged features, and its patches
    after the drop inside the LLM."""
    model = tiny_vscan_llava(attn, seed)
    eager = tiny_vscan_llava("eager", seed)
    batch = vscan_batch(PROMPTS, seed=seed, padding="left" if seed % 2 else "right")
    record, entering = run(model, vscan(kept, llm_layer, llm_kept), batch)
    for row in range(len(PROMPTS)):
        single = sample(batch, row, num_visual=NUM_VISUAL)
        expected, features, expected_llm = released_vscan(eager, single, kept, llm_layer, llm_kept)
        assert len(expected) == kept
        assert record.kept_visual_indices[row][1].tolist() == expected.tolist()
        assert record.kept_visual_indices[row][2].tolist() == expected_llm.tolist()
        mask = batch["attention_mask"][row].bool()
        ids = batch["input_ids"][row][mask]
        start = int((ids == IMAGE_TOKEN_ID).nonzero()[0])
        real = entering[row][-(len(ids) - NUM_VISUAL + kept) :]  # a drop right-aligns the kept tokens
        assert torch.allclose(real[start : start + kept], features, atol=1e-5)


@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize("kept", [100, 40])
def test_counts_the_windows_do_not_split_keep_the_release_set_and_the_global_scans_next(seed, kept):
    """The one count deviation: `int(T * 0.5)` not a multiple of the 16 windows makes the release keep fewer than T
    (100: 48 local + 50 global); the engine keeps T, the rest by the global scan (the local picks at 0)."""
    model = tiny_vscan_llava("sdpa", seed)
    batch = vscan_batch(PROMPTS[:1], seed=seed)
    record, _ = run(model, vscan(kept, None), batch)
    ours = set(record.kept_visual_indices[0][1].tolist())
    eager = tiny_vscan_llava("eager", seed)
    expected, _, _ = released_vscan(eager, batch, kept, None, 0)
    assert len(ours) == kept > len(expected)
    assert set(expected.tolist()) <= ours
    with torch.no_grad():
        attentions = eager.model.vision_tower(batch["pixel_values"], output_attentions=True).attentions
    deep = attentions[-2][0, :, 0, 1:].mean(0)
    local = (kept // 2) // 16 * 16
    deep[window_cls_selection(attentions[5][0, :, 0, 1:].mean(0)[None], kept // 2)[0]] = 0
    assert ours - set(expected.tolist()) == set(deep.topk(kept - local).indices.tolist()) - set(expected.tolist())


def test_several_images_per_sample_each_keep_the_release_set_of_that_image():
    """Two images in one prompt: each keeps what the release keeps for it, the sample's count split evenly."""
    model = tiny_vscan_llava("sdpa", 1)
    batch = vscan_batch([(2, 2, 4)], seed=1)
    config = PyramidDropConfig([0], [(2 * 64 + 0.5) / (2 * NUM_VISUAL)], method="vscan")
    record, _ = run(model, config, batch)
    kept = record.kept_visual_indices[0][1]
    eager = tiny_vscan_llava("eager", 1)
    for image in range(2):
        single = dict(batch, pixel_values=batch["pixel_values"][image : image + 1])
        with torch.no_grad():
            _, index_mask = encode_images(eager, single["pixel_values"], 64)
        ours = kept[(kept >= image * NUM_VISUAL) & (kept < (image + 1) * NUM_VISUAL)] - image * NUM_VISUAL
        assert ours.tolist() == index_mask[0].nonzero().flatten().tolist()


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_padded_generate_equals_each_row_alone(attn):
    """generate() on a left-padded batch with a text-only row and a two-image row: each row as alone."""
    prompts = [(3, 1, 6), (3, 0, 2), (1, 2, 4), (5, 1, 3)]
    batch = vscan_batch(prompts, seed=1)
    model = apply_pyramid_drop(tiny_vscan_llava(attn, 2, text_only=True), vscan(96, 3, 32))
    samples = [sample(batch, row, num_visual=NUM_VISUAL) for row in range(len(prompts))]
    assert_rows_equal_alone(model, batch, samples, steps=4, tol=1e-4)


def test_use_cache_false_equals_cached_decoding():
    batch = vscan_batch(PROMPTS, seed=3)
    model = apply_pyramid_drop(tiny_vscan_llava("sdpa", 3, text_only=True), vscan(64, 2, 20))
    cached = greedy(model, batch, 4)
    uncached = greedy(model, batch, 4, use_cache=False)
    assert uncached.sequences.tolist() == cached.sequences.tolist()
    for step in range(4):
        assert (uncached.logits[step] - cached.logits[step]).abs().max().item() < 1e-4


def test_paths_that_read_the_cache_length_are_refused():
    """As every drop before layer 0: generate() reads the cached length from layer 0, which holds the kept tokens."""
    model = apply_pyramid_drop(tiny_vscan_llava("sdpa", text_only=True), vscan(96, 3, 32))
    with pytest.raises(ValueError, match=r"a drop before the first layer .* cannot take prompt_lookup_num_tokens"):
        greedy(model, vscan_batch(PROMPTS[:1]), 2, prompt_lookup_num_tokens=3)


@pytest.mark.parametrize(
    "fields,message",
    [
        (dict(layer_list=[2], image_token_ratio_list=[0.5]), r"layer_list starts with 0 .*layer_list=\[0, 16\]"),
        (dict(layer_list=[0, 2], image_token_ratio_list=[0.5, 0.2], position_mode="original"), "'compact'"),
        (dict(layer_list=[0, 2], image_token_ratio_list=[0.5, 0.2], query="instruction_mean"), "query='last'"),
        (dict(layer_list=[0, 2], image_token_ratio_list=[0.5, 0.2], conversation="rerank"), "conversation='keep'"),
    ],
)
def test_vscan_refuses_what_the_release_does_not_do(fields, message):
    with pytest.raises(ValueError, match=message):
        PyramidDropConfig(method="vscan", **fields)


def test_a_tower_without_layer_5_is_refused_at_apply_time():
    with pytest.raises(ValueError, match=r"vision layers \[5, -2\].*this vision tower has 4 layers"):
        apply_pyramid_drop(tiny_vscan_llava(vision_layers=4), vscan(96, 3, 32))


def test_a_grid_whose_side_is_not_a_multiple_of_6_is_refused():
    model = apply_pyramid_drop(tiny_vscan_llava(pixels=56), vscan(16, 3, 8, num_visual=64))
    message = r"6 x 6 windows \(the release: 24 x 24\): an image of 64 tokens"
    with pytest.raises(ValueError, match=message), torch.no_grad():
        model(**vscan_batch(PROMPTS[:1], pixels=56))


@pytest.mark.parametrize("budget,before,inside", [(1 / 9, 96, 32), (2 / 9, 192, 64), (1 / 3, 288, 96)])
def test_budget_schedule_is_the_release_proportion(budget, before, inside):
    """The release's script keeps 96 before the LLM and 32 from layer 16 of 32 (64 on average); other budgets keep
    that 3:1 proportion at the middle layer."""
    from pyramiddrop.budget import schedule_for
    from pyramiddrop.flops import tokens_per_layer

    config = schedule_for("vscan", budget, 32, 576)
    assert (config.method, config.layer_list, config.position_mode) == ("vscan", [0, 16], "compact")
    assert tokens_per_layer(32, 576, config) == [before] * 16 + [inside] * 16


def test_beam_search_is_refused_with_what_to_change():
    """generate() encodes the images once, then repeats their features per beam: the tower's attention is per image."""
    model = apply_pyramid_drop(tiny_vscan_llava("sdpa", 4, text_only=True), vscan(96, 3, 32))
    with pytest.raises(ValueError, match=r"repeats the images for num_beams.*use num_beams=1"), torch.no_grad():
        model.generate(**vscan_batch(PROMPTS, seed=4), max_new_tokens=2, num_beams=3)


def test_training_merges_with_gradient():
    """With labels (training) the merged tokens carry the gradient of the tokens merged into them."""
    model = apply_pyramid_drop(tiny_vscan_llava("sdpa", 5), vscan(96, 3, 32)).train()
    batch = vscan_batch(PROMPTS[:1], seed=5)
    length = batch["input_ids"].shape[1]
    labels = batch["input_ids"].masked_fill(torch.arange(length) < length - 4, -100)  # the last 4 tokens answer
    embeds = []

    def keep_embeds(module, args, kwargs):
        kwargs["inputs_embeds"].retain_grad()
        embeds.append(kwargs["inputs_embeds"])

    model.model.language_model.register_forward_pre_hook(keep_embeds, with_kwargs=True)
    model(**batch, labels=labels).loss.backward()
    image = batch["input_ids"][0] == IMAGE_TOKEN_ID
    kept = get_drop_record(model).kept_visual_indices[0][1]
    assert len(kept) == 96
    dropped = torch.ones(NUM_VISUAL, dtype=torch.bool)
    dropped[kept] = False
    gradient = embeds[0].grad[0][image].abs().sum(-1)
    assert bool((gradient[dropped] > 0).all())  # every dropped token reaches the loss through its kept token


def test_llava_next_is_refused_at_apply_time():
    from tiny_models import tiny_llava_next

    with pytest.raises(ValueError, match=r"method 'vscan' ranks by the vision tower's attention.*not for LLaVA-NeXT"):
        apply_pyramid_drop(tiny_llava_next(), vscan(96, 3, 32))


def test_eval_at_a_budget_runs_vscan_on_its_own_schedule(tmp_path):
    """`pdrop eval --budget` (and `--baselines`) run VScan with its own two drops, on a tower it can scan."""
    import json

    from PIL import Image
    from tiny_models import save_tiny_llava_with_processor
    from transformers import AutoProcessor

    from pyramiddrop.cli import main

    save_tiny_llava_with_processor(tmp_path)
    processor = AutoProcessor.from_pretrained(tmp_path)
    processor.image_processor.size = {"shortest_edge": PIXELS}
    processor.image_processor.crop_size = {"height": PIXELS, "width": PIXELS}
    processor.save_pretrained(tmp_path)
    model = tiny_vscan_llava("sdpa")
    model.config.pad_token_id = 0
    model.save_pretrained(tmp_path)
    lines = []
    for index in range(4):
        Image.new("RGB", (PIXELS, PIXELS), (50 * index, 90, 200 - 40 * index)).save(tmp_path / f"q{index}.png")
        lines.append(json.dumps({"image": f"q{index}.png", "question": "what ?", "answer": "w7"}))
    (tmp_path / "questions.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "rows.json"
    data = str(tmp_path / "questions.jsonl")
    main(
        ["eval", "--model", str(tmp_path), "--data", data, "--budget", "0.33", "--methods", "pdrop,vscan"]
        + ["--json", str(out)]
    )
    rows = json.loads(out.read_text())
    assert [row["method"] for row in rows] == ["none", "pdrop", "vscan"]
    assert rows[2]["avg_visual_tokens"] == (3 * 285 + 3 * 95) / 6  # 285 before the LLM, 95 from layer 3 of 6
    main(["eval", "--model", str(tmp_path), "--data", data, "--lam", "0.5", "--baselines", "vscan", "--json", str(out)])
    rows = json.loads(out.read_text())
    assert [row["method"] for row in rows] == ["none", "pdrop", "vscan"]
    assert rows[2]["settings"]["budget"] == pytest.approx(rows[1]["avg_visual_tokens"] / NUM_VISUAL, abs=1e-4)


def test_flops_count_the_merge_before_layer_0_and_the_attention_ranking_inside():
    from pyramiddrop.flops import _attention_ranking, prefill_flops

    model_config = tiny_vscan_llava().config
    config = vscan(96, 3, 32)
    pdrop = PyramidDropConfig(config.layer_list, config.image_token_ratio_list)  # the same schedule, ranked by pdrop
    text, d = 20, model_config.text_config.hidden_size
    heads, head_dim = model_config.text_config.num_attention_heads, d // model_config.text_config.num_attention_heads
    q_dim, kv_dim = heads * head_dim, model_config.text_config.num_key_value_heads * head_dim
    difference = prefill_flops(model_config, text, NUM_VISUAL, config) - prefill_flops(
        model_config, text, NUM_VISUAL, pdrop
    )
    assert difference == NUM_VISUAL * NUM_VISUAL * d - _attention_ranking(
        text + NUM_VISUAL, NUM_VISUAL, d, q_dim, kv_dim
    )


def test_eval_refuses_vscan_on_a_shallow_tower_before_generating_anything(synthetic_model_dir, monkeypatch):
    """The embedded model's tower has 4 layers; VScan reads layers 5 and -2. `pdrop eval` says so before the first
    generation, not after every earlier setting has run."""
    from pyramiddrop.budget import vscan_schedule
    from pyramiddrop.settings import Setting
    from pyramiddrop.tools.evaluate import evaluate
    from pyramiddrop.tools.inputs import load_model

    processor, model = load_model(str(synthetic_model_dir))

    def generate(*args, **kwargs):
        raise AssertionError("generated before refusing")

    monkeypatch.setattr(model, "generate", generate)
    examples = [{"image": None, "question": "what ?", "answer": "red", "type": "color"}]
    settings = [Setting("none", None), Setting("vscan", vscan_schedule(0.33, 8, 144))]
    with pytest.raises(ValueError, match=r"vision layers \[5, -2\].*this vision tower has 4 layers"):
        evaluate(model, processor, examples, settings, progress=False)
