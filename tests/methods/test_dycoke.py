"""`method="dycoke-ttm"` is DyCoke's temporal token merging as released (KD-TAO/DyCoke dd746349): the oracle,
tests/support/dycoke_release.py, transcribes the release's `dycole_ttm` plainly. Random videos on tiny LLaVA-OneVision and
Qwen2-VL models; the families' own processors: tests/processors/test_dycoke_processors.py."""

import math

import pytest
import torch
from dycoke_release import dycole_ttm, llm_inputs, oracle, released_kept
from generation_checks import assert_rows_equal_alone, full_recompute, greedy
from tiny_models import (
    IMAGE_TOKEN_ID,
    VIDEO_TOKEN_ID,
    collate,
    qwen_sample,
    tiny_llava_onevision,
    tiny_qwen2_vl,
)

from pyramiddrop import PyramidDropConfig, apply_pyramid_drop, get_drop_record, remove_pyramid_drop

OV_SIZE = 56  # 8x8 patches pooled to 4x4: 16 tokens per frame


def ov_video(model, prefix: int, frames: int, suffix: int, seed: int) -> dict:
    """One OneVision video sample at the model's crop size: frames of `per_frame` tokens, then the newline."""
    generator = torch.Generator().manual_seed(seed)
    size = model.config.vision_config.image_size
    per_frame = math.ceil(size // 7 / 2) ** 2
    ids = [1] + torch.randint(2, IMAGE_TOKEN_ID, (prefix,), generator=generator).tolist()
    ids += [VIDEO_TOKEN_ID] * (frames * per_frame + 1)
    ids += torch.randint(2, IMAGE_TOKEN_ID, (suffix,), generator=generator).tolist()
    return {
        "input_ids": torch.tensor([ids]),
        "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
        "pixel_values_videos": torch.randn(1, frames, 3, size, size, generator=generator),
    }


def engine_kept(model, batch: dict, config: PyramidDropConfig) -> list[set[int]]:
    apply_pyramid_drop(model, config)
    with torch.no_grad():
        model(**batch)
    kept = [set(row[1].tolist()) for row in get_drop_record(model).kept_visual_indices]
    remove_pyramid_drop(model)
    return kept


@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize("k", [0.7, 0.5, 0.2])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_onevision_keeps_what_released_ttm_keeps(seed, k, attn):
    """Videos of 5 to 12 frames of 16 tokens in one padded batch: every row keeps exactly the release's set alone."""
    model = tiny_llava_onevision(attn, seed=seed, size=OV_SIZE)
    counts = [5, 6, 7, 8, 9, 12]
    samples = [ov_video(model, 1 + i % 3, frames, 2 + i % 2, seed=10 * seed + i) for i, frames in enumerate(counts)]
    # OneVision's processor takes one frame count per batch: a batch per count, each row checked.
    for single, frames in zip(samples, counts):
        batch = collate([single, ov_video(model, 4, frames, 1, seed=99)])
        kept = engine_kept(model, batch, PyramidDropConfig.dycoke_ttm(k))
        assert kept[0] == oracle(model, single, 16, k, newline=True), frames


@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize("k", [0.7, 0.4])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_qwen2_vl_keeps_what_released_ttm_keeps(seed, k, attn):
    """Qwen2-VL frames (temporal patches) of 16 and 8 tokens, videos of 5 to 13 frames, one with an image before it
    (kept whole), in one left-padded batch at original positions."""
    segments = [
        [3, ("video", 5, 8, 8), 2],
        [1, ("image", 4, 8), 2, ("video", 8, 4, 8), 3],
        [2, ("video", 9, 8, 8), 1],
        [4, ("video", 13, 4, 8), 2],
    ]
    samples = [qwen_sample(parts, seed=10 * seed + i) for i, parts in enumerate(segments)]
    model = tiny_qwen2_vl(attn, seed=seed)
    kept = engine_kept(model, collate(samples), PyramidDropConfig.dycoke_ttm(k, position_mode="original"))
    for row, (single, parts) in enumerate(zip(samples, segments)):
        _, _, h, w = parts[-2]
        assert kept[row] == oracle(model, single, h * w // 4, k, newline=False), row


def test_keep_counts_follow_the_release_windows():
    """What each frame keeps (k=0.7, 16 tokens: 4 in a compared frame): frames 0, 4, 8.. whole; frame i+2 of the
    window the release's range(0, F-4, 4) leaves out whole; an odd count's last frame gone."""
    model = tiny_qwen2_vl(seed=0)
    expected = {
        5: [16, 4, 4, 4, 0],
        8: [16, 4, 4, 4, 16, 4, 16, 4],
        9: [16, 4, 4, 4, 16, 4, 4, 4, 0],
        10: [16, 4, 4, 4, 16, 4, 4, 4, 16, 4],
    }
    for frames, per_frame in expected.items():
        single = qwen_sample([2, ("video", frames, 8, 8), 2], seed=frames)
        kept = engine_kept(model, single, PyramidDropConfig.dycoke_ttm(0.7, position_mode="original"))[0]
        assert [len(kept & set(range(16 * f, 16 * f + 16))) for f in range(frames)] == per_frame


def test_images_keep_every_token():
    model = tiny_qwen2_vl(seed=0)
    single = qwen_sample([2, ("image", 8, 8), 3], seed=0)
    apply_pyramid_drop(model, PyramidDropConfig.dycoke_ttm(position_mode="original"))
    with torch.no_grad():
        model(**single)
    kept = get_drop_record(model).kept_visual_indices[0]
    assert torch.equal(kept[1], kept[0]) and len(kept[0]) == 16


@pytest.mark.parametrize("family", ["onevision", "qwen2_vl"])
def test_padded_video_batch_decodes_each_row_as_alone(family):
    if family == "onevision":
        model = tiny_llava_onevision(seed=1, size=OV_SIZE)
        samples = [ov_video(model, p, 6, s, seed=p) for p, s in [(1, 4), (5, 1), (3, 2)]]
        config = PyramidDropConfig.dycoke_ttm(0.7)
    else:
        model = tiny_qwen2_vl(seed=1)
        samples = [
            qwen_sample([3, ("video", 6, 8, 8), 2], seed=1),
            qwen_sample([1, ("image", 8, 8), 1, ("video", 5, 4, 8), 4], seed=2),
            qwen_sample([5, ("image", 4, 8), 3], seed=3),
        ]
        config = PyramidDropConfig.dycoke_ttm(0.7, position_mode="original")
    apply_pyramid_drop(model, config)
    assert_rows_equal_alone(model, collate(samples), samples, 4, 1e-4)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("position_mode", ["compact", "original"])
def test_cached_decoding_equals_a_forward_without_cache(attn, position_mode):
    """TTM reads no query: a no-cache forward of prompt + generated tokens keeps the same tokens, so every step's
    logits equal cached decoding's (OneVision; compact positions are the release's)."""
    model = tiny_llava_onevision(attn, seed=2, size=OV_SIZE)
    batch = collate([ov_video(model, 2, 7, 3, seed=1), ov_video(model, 4, 7, 1, seed=2)])
    apply_pyramid_drop(model, PyramidDropConfig.dycoke_ttm(0.7, position_mode=position_mode))
    out = greedy(model, batch, 4)
    assert [len(kept[1]) for kept in get_drop_record(model).kept_visual_indices] == [
        16 * 2 + 4 * 4
    ] * 2  # frames 0, 4 whole; 1, 2, 3, 5 compared; 6 gone
    for step in range(4):
        logits = full_recompute(model, batch, out.sequences, step)
        assert (logits - out.logits[step]).abs().max().item() < 1e-4, f"step {step}"
    uncached = greedy(model, batch, 4, use_cache=False)
    assert uncached.sequences.tolist() == out.sequences.tolist()


def test_beam_search_equals_each_sample_alone():
    model = tiny_llava_onevision(seed=3, size=OV_SIZE)
    samples = [ov_video(model, 2, 6, 3, seed=1), ov_video(model, 5, 6, 1, seed=2)]
    apply_pyramid_drop(model, PyramidDropConfig.dycoke_ttm(0.7))
    options = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, num_beams=3, num_return_sequences=2)
    with torch.no_grad():
        out = model.generate(**collate(samples), **options)
        for index, single in enumerate(samples):
            alone = model.generate(**single, **options)
            assert alone[:, -4:].tolist() == out[2 * index : 2 * index + 2, -4:].tolist()


@pytest.mark.parametrize(
    "fields,message",
    [
        (dict(layer_list=[2]), r"merges a video's frames once, before the language model.*layer_list=\[0\]"),
        (dict(layer_list=[0, 2], image_token_ratio_list=[0.3, 0.1]), r"got layer_list=\[0, 2\]"),
        (dict(video_pool="sample"), "use video_pool='frame'"),
        (dict(conversation="rerank"), "use conversation='keep'"),
        (dict(query="instruction_mean"), "leave query='last'"),
    ],
)
def test_settings_the_release_has_no_counterpart_for_are_refused(fields, message):
    base = dict(layer_list=[0], image_token_ratio_list=[0.3], method="dycoke-ttm", video_pool="frame")
    with pytest.raises(ValueError, match=message):
        PyramidDropConfig(**(base | fields))


@pytest.mark.parametrize("k", [1.0, -0.1])
def test_k_outside_the_release_range_is_refused(k):
    with pytest.raises(ValueError, match=r"k \(DyCoke's dycoke_k.*must be in \[0, 1\)"):
        PyramidDropConfig.dycoke_ttm(k)


def test_videos_of_four_frames_or_fewer_are_refused():
    """The release fails on them (`torch.stack` of no frame-i/i+2 comparison); here, a message before any drop."""
    model = apply_pyramid_drop(tiny_qwen2_vl(seed=0), PyramidDropConfig.dycoke_ttm(position_mode="original"))
    message = "needs videos of at least 5 frames.*Sample 0 has a video of 4 frames"
    with pytest.raises(ValueError, match=message), torch.no_grad():
        model(**qwen_sample([2, ("video", 4, 8, 8), 2], seed=0))
    with pytest.raises(RuntimeError, match="stack expects a non-empty TensorList"):  # what the release does
        dycole_ttm(torch.randn(4 * 16, 8), 16, 0.7)


def test_no_budget_schedule_and_no_config_flops():
    from pyramiddrop import budget, flops

    with pytest.raises(ValueError, match="'dycoke-ttm' merges video frames only.*no schedule at a budget"):
        budget.schedule_for("dycoke-ttm", 1 / 3, 8, 576)
    with pytest.raises(ValueError, match="count its tokens per layer from the drop record"):
        flops.paper_flops(8, 64, 128, 576, PyramidDropConfig.dycoke_ttm())


def test_paths_that_read_the_cache_length_are_refused():
    """generate() reads the cached length from layer 0, which after a pre-LLM drop holds only the kept tokens."""
    model = tiny_llava_onevision(seed=0, size=OV_SIZE)
    apply_pyramid_drop(model, PyramidDropConfig.dycoke_ttm(0.7))
    single = ov_video(model, 2, 6, 2, seed=0)
    message = r"a drop before the first layer \(layer_list\[0\] == 0\) cannot take {}"
    with pytest.raises(ValueError, match=message.format("prompt_lookup_num_tokens")):
        greedy(model, single, 2, prompt_lookup_num_tokens=3)
    first = greedy(model, single, 2)
    conversation = torch.cat([first.sequences, torch.tensor([[5, 6, 7]])], 1)
    follow_up = {"input_ids": conversation, "attention_mask": torch.ones_like(conversation)}
    with pytest.raises(ValueError, match=message.format("a cache to continue")):
        greedy(model, follow_up, 2, cache=first.cache)


@pytest.mark.parametrize("seed", range(2))
def test_onevision_logits_equal_the_release_merged_sequence(seed):
    """The language model on the release's merged sequence (text, the merged video with each compared frame's kept
    tokens in `topk` order, least similar first, the newline, text; positions 0..n-1, its `compact` renumbering)
    gives our logits; the same tokens in frame order would not."""
    model = tiny_llava_onevision("eager", seed=seed, size=OV_SIZE)
    single = ov_video(model, 3, 9, 4, seed=seed)
    embeds, ids = llm_inputs(model, single), single["input_ids"][0]
    video = (ids == VIDEO_TOKEN_ID).nonzero().flatten()[:-1]
    release_order = released_kept(embeds[video], 16, 0.7)

    def logits_of(order: list[int]) -> torch.Tensor:
        merged = torch.cat([embeds[: int(video[0])], embeds[video][order], embeds[int(video[-1]) + 1 :]])
        with torch.no_grad():
            hidden = model.model.language_model(inputs_embeds=merged[None]).last_hidden_state
            return model.lm_head(hidden[:, -1])

    apply_pyramid_drop(model, PyramidDropConfig.dycoke_ttm(0.7))
    with torch.no_grad():
        ours = model(**single).logits[:, -1]
    assert (ours - logits_of(release_order)).abs().max().item() < 1e-5
    assert (ours - logits_of(sorted(release_order))).abs().max().item() > 1e-3


def test_score_order_lays_each_groups_kept_tokens_on_its_kept_slots_by_score():
    """Text stays; group 0 (split by text, as a sample's images are) and group 1 swap their kept tokens among their
    own kept slots, highest score first; a dropped token's slot is not reused. Compact positions count in that
    order, original positions travel with their tokens."""
    from pyramiddrop.engine.stages import Stage, drop_stage, score_order

    group = torch.tensor([[-1, 0, 0, -1, 0, 1, 1, 1]])
    scores = torch.tensor([[0.0, 0.1, 0.9, 0.0, 0.5, 0.3, 0.7, 0.2]])
    selected = torch.tensor([[False, True, True, False, True, True, True, False]])
    keys = score_order(scores, group, selected)
    assert keys[0, selected[0]].tolist() == [4, 1, 2, 6, 5]
    assert keys[0, ~selected[0]].tolist() == [0, 3, 7]
    positions = torch.arange(8)[None] * 10
    stage = Stage(
        attention_mask=torch.ones(1, 8, dtype=torch.bool),
        positions=positions,
        source_index=torch.arange(8)[None],
        pool_index=torch.where(group >= 0, (group >= 0).long().cumsum(1) - 1, -1),
        group_index=group,
        query_mask=torch.zeros(1, 8, dtype=torch.bool),
        dropped=torch.zeros(1, dtype=torch.long),
    )
    compact, index = drop_stage(stage, selected, "compact", keys)
    assert index.tolist() == [[0, 2, 4, 3, 1, 6, 5]]
    assert (
        compact.positions.tolist() == [[0, 10, 20, 30, 40, 50, 60]] and compact.source_index.tolist() == index.tolist()
    )
    original, _ = drop_stage(stage, selected, "original", keys)
    assert original.positions.tolist() == [[0, 20, 40, 30, 10, 60, 50]]


def test_pdrop_eval_refuses_it_before_loading(capsys):
    """`pdrop eval` asks image questions, of which dycoke-ttm keeps every token."""
    from pyramiddrop.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--model", "owner/does-not-matter", "--budget", "0.25", "--methods", "pdrop,dycoke-ttm"])
    assert exit_info.value.code == 2
    assert "argument --methods: dycoke-ttm merges video frames only" in capsys.readouterr().err


def test_rerank_of_a_video_conversation_equals_a_fresh_prefill():
    """Not dycoke-ttm (it refuses `rerank`), the frames it reads: a follow-up turn re-ranks per video frame with the
    conversation's frames (pdrop, OneVision), as a fresh prefill of the whole conversation does."""
    model = tiny_llava_onevision(seed=4, size=OV_SIZE)
    model.lm_head.weight.data[IMAGE_TOKEN_ID:] = 0  # text answers only: the conversation is re-run with its video
    batch = collate([ov_video(model, 2, 5, 3, seed=1), ov_video(model, 4, 5, 1, seed=2)])
    config = PyramidDropConfig([2], [0.3], video_pool="frame", conversation="rerank")
    apply_pyramid_drop(model, config)
    first = greedy(model, batch, 3)
    follow_up = torch.randint(2, 30, (2, 4), generator=torch.Generator().manual_seed(3))
    conversation = torch.cat([first.sequences, follow_up], 1)
    mask = torch.cat([batch["attention_mask"], torch.ones_like(conversation[:, batch["input_ids"].shape[1] :])], 1)
    out = greedy(model, {"input_ids": conversation, "attention_mask": mask}, 3, cache=first.cache)
    record = get_drop_record(model)
    fresh = greedy(model, dict(batch, input_ids=conversation, attention_mask=mask), 3)
    assert out.sequences.tolist() == fresh.sequences.tolist()
    fresh_record = get_drop_record(model)
    for row in range(2):
        assert torch.equal(record.kept_visual_indices[row][1], fresh_record.kept_visual_indices[row][1])
        assert torch.equal(record.visual_frame_index[row], fresh_record.visual_frame_index[row])
