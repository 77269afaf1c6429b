"""Videos through each family's own video processor (LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL, Qwen3-VL,
LLaVA-NeXT-Video): seeded frames -> processor -> PyramidDrop. The kept counts are what the processor emitted,
cached `generate()` equals a full recompute of the dropped sequence, a padded batch of two videos of different
lengths equals each alone (both video pools), and `pdrop show --video` draws the frame strip from a saved model.

Needs torchvision (transformers' video processors are written on it): run in `.venv-vllm`
(`.venv-vllm/bin/python -m pytest -q -m torchvision tests/processors`); elsewhere the module skips."""

import ast
from dataclasses import replace

import pytest

pytest.importorskip("torchvision", reason="transformers' video processors need torchvision: run in .venv-vllm")

import torch  # noqa: E402
from generation_checks import (  # noqa: E402
    assert_cached_equals_recompute,
    assert_rows_equal_alone,
    replay_scorer,
)
from video_families import VIDEO_FAMILIES, frames, two_videos, video_batch, video_prompt  # noqa: E402

from pyramiddrop import PyramidDropConfig, apply_pyramid_drop, get_drop_record  # noqa: E402

pytestmark = pytest.mark.torchvision

STEPS = 5
TOL = 3e-5  # float32: cached vs recomputed and batched vs alone differ by rounding only
RATIOS = [0.5, 0.25]
NAMES = list(VIDEO_FAMILIES)
_REPLAY = ("replay_for_video_processor_tests", replay_scorer("replay_for_video_processor_tests"))


def config_for(family, **changes) -> PyramidDropConfig:
    config = PyramidDropConfig(layer_list=[2, 4], image_token_ratio_list=RATIOS, position_mode=family.position_mode)
    return replace(config, **changes)


def model_frames(batch: dict) -> list[int]:
    """The number of frames the model sees per video: Qwen merges two input frames into one temporal patch."""
    if "video_grid_thw" in batch:
        return batch["video_grid_thw"][:, 0].tolist()
    return [batch["pixel_values_videos"].shape[1]] * batch["pixel_values_videos"].shape[0]


def built(name: str) -> tuple:
    """The family, its tiny model and processor, and the processor's batch of the two test videos."""
    family = VIDEO_FAMILIES[name]
    model, processor = family.build(), family.processor()
    return family, model, processor, video_batch(processor, family, *two_videos(family))


@pytest.mark.parametrize("video_pool", ["sample", "frame"])
@pytest.mark.parametrize("name", NAMES)
def test_kept_counts_are_the_processors_video_tokens(name, video_pool):
    family, model, _, batch = built(name)
    assert not batch["attention_mask"].all()  # left padding
    apply_pyramid_drop(model, config_for(family, video_pool=video_pool))
    with torch.no_grad():
        model(**batch)
    record = get_drop_record(model)

    emitted = (batch["input_ids"] == model.config.video_token_id).sum(1).tolist()
    newline = 1 if name == "llava_onevision" else 0  # OneVision ends a video with one newline token (kept)
    assert record.num_layout_tokens == [newline] * 2
    assert record.num_visual_tokens == [count - newline for count in emitted]
    if name.startswith("qwen"):  # every frame kept: the two videos differ in length after the processor too
        assert emitted[0] < emitted[1]
    for row, (visual, num_frames) in enumerate(zip(record.num_visual_tokens, model_frames(batch))):
        per_frame = visual // num_frames
        frame_of = record.visual_frame_index[row]
        assert frame_of.tolist() == [frame for frame in range(num_frames) for _ in range(per_frame)]
        for stage, ratio in enumerate([1.0, *RATIOS]):
            kept = record.kept_visual_indices[row][stage]
            if video_pool == "sample":
                assert len(kept) == int(visual * ratio)
            else:  # the same share of every frame
                counts = torch.bincount(frame_of[kept], minlength=num_frames).tolist()
                assert counts == [int(per_frame * ratio)] * num_frames
        assert record.visual_tokens_per_layer[row, -1] == len(kept) + newline


@pytest.mark.parametrize("video_pool", ["sample", "frame"])
@pytest.mark.parametrize("name", NAMES)
def test_generate_equals_full_recompute(name, video_pool):
    family, model, _, batch = built(name)
    assert_cached_equals_recompute(model, batch, config_for(family, video_pool=video_pool), _REPLAY, STEPS, TOL)


@pytest.mark.parametrize("video_pool", ["sample", "frame"])
@pytest.mark.parametrize("name", NAMES)
def test_padded_batch_of_two_videos_equals_each_alone(name, video_pool):
    family, model, processor, batch = built(name)
    texts, clips = two_videos(family)
    alone = [video_batch(processor, family, [text], [clip]) for text, clip in zip(texts, clips)]
    assert [sample["input_ids"].shape[1] for sample in alone] != [batch["input_ids"].shape[1]] * 2
    apply_pyramid_drop(model, config_for(family, video_pool=video_pool))
    assert_rows_equal_alone(model, batch, alone, STEPS, TOL)


@pytest.mark.parametrize("name", NAMES)
def test_pdrop_show_video_draws_the_frame_strip(name, tmp_path, capsys):
    pytest.importorskip(
        "matplotlib", reason="pdrop show draws with matplotlib (the plots extra), which .venv-vllm's lock lacks"
    )
    from PIL import Image

    from pyramiddrop.cli import main

    family = VIDEO_FAMILIES[name]
    model, processor = family.build(), family.processor()
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    clip = frames(family.lengths[0], family.frame_size, seed=7)
    folder = tmp_path / "frames"
    folder.mkdir()
    for index, frame in enumerate(clip):
        Image.fromarray(frame).save(folder / f"{index:03d}.png")
    out = tmp_path / "strip.png"
    args = ["show", "--model", str(tmp_path / "model"), "--video", str(folder), "--prompt", "w5 w6"]
    args += ["--frames", str(len(clip)), "--layer-list", "2", "4", "--ratios", *map(str, RATIOS)]
    args += ["--position-mode", family.position_mode, "--video-pool", "frame", "--out", str(out)]
    main(args)
    printed = capsys.readouterr().out
    counts = ast.literal_eval(printed.split("kept tokens per stage and frame: ")[1].split("; wrote")[0])

    num_frames = len(counts[0])
    assert num_frames == (len(clip) + 1) // 2 if name.startswith("qwen") else len(clip)
    per_frame = counts[0][0]
    assert counts == [[int(per_frame * ratio)] * num_frames for ratio in [1.0, *RATIOS]]
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size[0] > 150 * num_frames  # one column per frame


@pytest.mark.parametrize("name", ["llava_onevision", "llava_next_video"])
def test_processor_refuses_videos_of_different_lengths_unless_it_samples_them(name):
    """Why these families' test videos are sampled to one frame count (docs/configuration.md, Video)."""
    family = VIDEO_FAMILIES[name]
    processor = family.processor()
    texts, clips = two_videos(family)
    prompts = [video_prompt(processor, family, text) for text in texts]
    with pytest.raises(ValueError, match="pixel_values_videos"):
        processor(text=prompts, videos=clips, return_tensors="pt", padding=True)
