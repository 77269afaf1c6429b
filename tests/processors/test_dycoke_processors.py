"""`dycoke-ttm` on videos from LLaVA-OneVision's and Qwen2-VL's own processors (seeded frames -> processor ->
model): each row of a left-padded batch keeps what the release's `dycole_ttm` keeps for that video alone
(tests/support/dycoke_release.py). Needs torchvision: run in `.venv-vllm` (`-m torchvision tests/processors`)."""

import pytest

pytest.importorskip("torchvision", reason="transformers' video processors need torchvision: run in .venv-vllm")

from dataclasses import replace  # noqa: E402

import torch  # noqa: E402
from dycoke_release import oracle  # noqa: E402
from video_families import VIDEO_FAMILIES, frames, video_batch  # noqa: E402

from pyramiddrop import PyramidDropConfig, apply_pyramid_drop, get_drop_record, remove_pyramid_drop  # noqa: E402

pytestmark = pytest.mark.torchvision


@pytest.mark.parametrize(
    "name,lengths,per_frame,k",
    [
        ("llava_onevision", (6, 6), 4, 0.5),  # sampled to 6 frames of 2x2 pooled tokens
        ("qwen2_vl", (12, 18), 16, 0.7),  # 6 and 9 temporal patches of 16 tokens (the last of 9 is dropped)
    ],
)
def test_processor_videos_keep_what_released_ttm_keeps(name, lengths, per_frame, k):
    family = VIDEO_FAMILIES[name]
    if name == "llava_onevision":
        family = replace(family, call=dict(do_sample_frames=True, num_frames=lengths[0]))
    model, processor = family.build(), family.processor()
    texts = ["w5 w6 w7 w8", "w9"]
    clips = [
        frames(count, family.frame_size, seed) for seed, count in enumerate((8, 10) if name != "qwen2_vl" else lengths)
    ]
    batch = video_batch(processor, family, texts, clips)
    assert not batch["attention_mask"].all()  # left padding
    apply_pyramid_drop(model, PyramidDropConfig.dycoke_ttm(k, position_mode=family.position_mode))
    with torch.no_grad():
        model(**batch)
    kept = [set(row[1].tolist()) for row in get_drop_record(model).kept_visual_indices]
    remove_pyramid_drop(model)
    for row, (text, clip) in enumerate(zip(texts, clips)):
        alone = video_batch(processor, family, [text], [clip])
        expected = oracle(model, alone, per_frame, k, newline=name == "llava_onevision")
        assert kept[row] == expected
        assert len(expected) < int((alone["input_ids"] == model.config.video_token_id).sum())
