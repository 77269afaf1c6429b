"""The tiny video models of tests/support/tiny_models.py and tests/support/tiny_families.py with their families' own
processor classes *including the video processor* (transformers writes every video processor on torchvision): seeded
uint8 frames go in, the processor samples, resizes, normalises and lays out the video tokens (OneVision's
newline, Qwen3-VL's per-frame timestamps and blocks), and the model gets exactly what a user's call would give."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import numpy as np
from tiny_families import NEXT_VIDEO_TOKENS, tiny_llava_next_video
from tiny_models import tiny_llava_onevision, tiny_qwen2_5_vl, tiny_qwen2_vl, tiny_qwen3_vl
from tiny_processors import (
    QWEN_TOKENS,
    WORDS,
    chat_template,
    llava_next_image_processor,
    llava_processor_kwargs,
    word_tokenizer,
)


@dataclass
class VideoFamily:
    """A tiny video model and its processor. `lengths` are the input frame counts of the two test videos and
    `call` the processor's video arguments: LLaVA-OneVision and LLaVA-NeXT-Video take one
    `[videos, frames, 3, H, W]` tensor, so their processors sample every video to `num_frames`; the Qwen
    processors keep every frame (two per temporal patch) and the two videos differ in token count too."""

    name: str
    build: object  # (attn) -> model
    processor: object  # () -> processor
    video_token: str  # what the chat template writes for a video
    frame_size: tuple[int, int]  # (height, width) of the test frames
    lengths: tuple[int, int]
    call: dict = field(default_factory=dict)
    position_mode: str = "compact"


def onevision_video_processor():
    from transformers import (
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
    )

    images = LlavaOnevisionImageProcessor(
        size={"height": 28, "width": 28}, image_grid_pinpoints=[[28, 56], [56, 28], [56, 56]]
    )
    named = {"image_token": "<image>", "video_token": "<video>"}
    return LlavaOnevisionProcessor(
        images,
        word_tokenizer(["<image>", "<video>"], named),
        LlavaOnevisionVideoProcessor(size={"height": 28, "width": 28}),
        num_image_tokens=17,
        vision_feature_select_strategy="default",
        chat_template=chat_template("<image>", "<video>"),
    )


QWEN_VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"


def qwen_video_processor(family: str):
    """2 px patches merged 2x2, two frames per temporal patch; frames up to 32 x 32 px keep their size."""
    import transformers

    class_name = {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor"}.get(family, "Qwen3VLProcessor")
    video_class = "Qwen3VLVideoProcessor" if family.startswith("qwen3") else "Qwen2VLVideoProcessor"
    sizes = dict(patch_size=2, merge_size=2, temporal_patch_size=2)
    images = transformers.Qwen2VLImageProcessor(**sizes, size={"shortest_edge": 8 * 8, "longest_edge": 32 * 32})
    videos = getattr(transformers, video_class)(**sizes, size={"shortest_edge": 8 * 8, "longest_edge": 32 * 32 * 8})
    named = dict(zip(["image_token", "video_token", "vision_start_token", "vision_end_token"], QWEN_TOKENS))
    return getattr(transformers, class_name)(
        images,
        word_tokenizer(QWEN_TOKENS, named),
        videos,
        chat_template=chat_template("<|vision_start|><|image_pad|><|vision_end|>", QWEN_VIDEO),
    )


def next_video_processor():
    from transformers import LlavaNextVideoProcessor, LlavaNextVideoVideoProcessor

    named = {"image_token": "<image>", "video_token": "<video>"}
    videos = LlavaNextVideoVideoProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    kwargs = llava_processor_kwargs() | {"chat_template": chat_template("<image>", "<video>")}
    return LlavaNextVideoProcessor(
        videos, llava_next_image_processor(), word_tokenizer(NEXT_VIDEO_TOKENS, named), **kwargs
    )


# Qwen2-VL's video processor warns that its per-frame pixel cap changes in transformers 5.22; these frames are far
# below either cap, and passing the flag keeps the same frames on every supported version.
_QWEN_CALL = {"cap_pixels_per_frame": True}

VIDEO_FAMILIES = {
    "llava_onevision": VideoFamily(
        "llava_onevision",
        tiny_llava_onevision,
        onevision_video_processor,
        "<video>",
        (40, 48),
        (4, 7),
        dict(do_sample_frames=True, num_frames=4),
    ),
    "qwen2_vl": VideoFamily(
        "qwen2_vl",
        tiny_qwen2_vl,
        partial(qwen_video_processor, "qwen2_vl"),
        QWEN_VIDEO,
        (16, 16),
        (4, 6),
        _QWEN_CALL,
        "original",
    ),
    "qwen2_5_vl": VideoFamily(
        "qwen2_5_vl",
        tiny_qwen2_5_vl,
        partial(qwen_video_processor, "qwen2_5_vl"),
        QWEN_VIDEO,
        (16, 16),
        (4, 6),
        _QWEN_CALL,
        "original",
    ),
    # Frames as given (no fps sampling; the timestamps then assume 24 fps, as the processor says).
    "qwen3_vl": VideoFamily(
        "qwen3_vl",
        tiny_qwen3_vl,
        partial(qwen_video_processor, "qwen3_vl"),
        QWEN_VIDEO,
        (16, 16),
        (4, 6),
        _QWEN_CALL | {"do_sample_frames": False},
        "original",
    ),
    "llava_next_video": VideoFamily(
        "llava_next_video",
        tiny_llava_next_video,
        next_video_processor,
        "<video>",
        (40, 48),
        (3, 5),
        dict(do_sample_frames=True, num_frames=3),
    ),
}


def frames(count: int, size: tuple[int, int], seed: int) -> np.ndarray:
    """A seeded clip: `[count, height, width, 3]` uint8, a coloured square moving over a noisy background."""
    rng = np.random.default_rng(seed)
    height, width = size
    clip = rng.integers(0, 256, (count, height, width, 3), dtype=np.uint8)
    colour = rng.integers(0, 256, 3, dtype=np.uint8)
    for index in range(count):
        top, left = (index * 3) % (height // 2), (index * 5) % (width // 2)
        clip[index, top : top + height // 2, left : left + width // 2] = colour
    return clip


def video_prompt(processor, family: VideoFamily, text: str) -> str:
    turn = {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": text}]}
    return processor.apply_chat_template([turn], add_generation_prompt=True)


def video_batch(processor, family: VideoFamily, texts: list[str], clips: list[np.ndarray]) -> dict:
    """One left-padded batch, `texts[i]` after video `clips[i]`, straight from the processor."""
    prompts = [video_prompt(processor, family, text) for text in texts]
    return dict(processor(text=prompts, videos=clips, return_tensors="pt", padding=True, **family.call))


def two_videos(family: VideoFamily) -> tuple[list[str], list[np.ndarray]]:
    """The suite's two prompts: different text lengths and videos of `family.lengths` frames."""
    clips = [frames(count, family.frame_size, seed) for seed, count in enumerate(family.lengths)]
    return ["w5 w6 w7 w8", "w9"], clips


def smolvlm_video_processor():
    """SmolVLM with its video processor: frames become 56 px images of 16 `<image>` tokens each, announced by a
    spelled-out frame count (`num2words`) and per-frame timestamps; at most 8 frames, 1 fps, as the hub configs'
    `video_sampling` block sets it."""
    import transformers
    from tiny_families import IDEFICS_TOKENS

    images = transformers.SmolVLMImageProcessor(
        do_image_splitting=True, size={"longest_edge": 112}, max_image_size={"longest_edge": 56}
    )
    videos = transformers.SmolVLMVideoProcessor(
        max_image_size={"longest_edge": 56},
        video_sampling={"max_frames": 8, "fps": 1, "video_size": {"longest_edge": 56}},
    )
    tokenizer = word_tokenizer(IDEFICS_TOKENS, extra_words=(*WORDS, "three", "four", "five"))  # spelled frame counts
    return transformers.SmolVLMProcessor(
        images, tokenizer, videos, image_seq_len=16, chat_template=chat_template("<image>")
    )
