"""The correctness sections of `benchmarks/gpu.py`, on tiny random models built here (`tests/support/tiny_models.py`).

- `correctness_checks`: on the device in float32, for each attention backend and position mode, a left-padded
  batch gives each sample's tokens, logits and kept visual tokens as that sample alone, and cached greedy
  decoding gives the logits of a full recompute without a cache (the recompute replays the prefill's kept set,
  since a longer sequence would rank again). The same properties as tests/engine/test_engine.py, on the GPU's kernels.
- `video_checks`: `pdrop show --video` (the command line itself) on a tiny Qwen2-VL and a tiny LLaVA-OneVision
  saved with processors built here (word-level tokenizer, PIL image processor, the torchvision video
  processor), checking the kept tokens of every stage and frame against the schedule.

Each returns a list of check dicts with a boolean `passed`; nothing asserts, so one failing check is recorded
and the others still run.
"""

from __future__ import annotations

import ast
import contextlib
import io
import tempfile
from dataclasses import replace
from pathlib import Path

import tiny_models as tm  # tests/support/tiny_models.py (benchmarks/gpu.py puts it on the path)
import torch
from generation_checks import full_recompute, greedy, replay_scorer  # tests/support/generation_checks.py

from pyramiddrop import PyramidDropConfig, apply_pyramid_drop, get_drop_record

STEPS = 6  # greedy tokens per check
TOLERANCE = 1e-4  # float32 logits: batched vs alone and cached vs recomputed differ by rounding only
PDROP = PyramidDropConfig(layer_list=[2, 4], image_token_ratio_list=[0.5, 0.25])
PROMPTS = [(3, 1, 6), (1, 1, 2), (5, 2, 4)]  # (text before, images, text after): different lengths, so padded

_REPLAY = replay_scorer("replay_for_gpu_checks")


@contextlib.contextmanager
def exact_float32():
    """No TF32 in matrix products or convolutions while the checks run (restored after)."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def _on(batch: dict, device: str) -> dict:
    return {key: value.to(device) for key, value in batch.items()}


def padded_batch_equals_samples_alone(attn: str, position_mode: str, device: str) -> dict:
    model = tm.tiny_llava(attn, kv_heads=2).to(device)
    apply_pyramid_drop(model, replace(PDROP, position_mode=position_mode))
    batch = tm.llava_batch(PROMPTS)
    out = greedy(model, _on(batch, device), STEPS)
    batch_kept = get_drop_record(model).kept_visual_indices
    prompt_length = batch["input_ids"].shape[1]
    tokens_equal, kept_equal, max_diff = True, True, 0.0
    for index in range(len(PROMPTS)):
        alone = tm.sample(batch, index)
        single = greedy(model, _on(alone, device), STEPS)
        tokens_equal &= (
            single.sequences[0, alone["input_ids"].shape[1] :].tolist() == out.sequences[index, prompt_length:].tolist()
        )
        for step in range(STEPS):
            max_diff = max(max_diff, (single.logits[step][0] - out.logits[step][index]).abs().max().item())
        alone_kept = get_drop_record(model).kept_visual_indices[0]
        kept_equal &= all(torch.equal(alone_kept[s], batch_kept[index][s]) for s in range(len(alone_kept)))
    return {
        "check": "padded batch = samples alone",
        "tokens_equal": tokens_equal,
        "kept_equal": kept_equal,
        "max_abs_logit_diff": max_diff,
        "passed": bool(tokens_equal and kept_equal and max_diff < TOLERANCE),
    }


def cached_decoding_equals_full_recompute(attn: str, position_mode: str, device: str) -> dict:
    model = tm.tiny_llava(attn, kv_heads=2).to(device)
    config = replace(PDROP, position_mode=position_mode)
    apply_pyramid_drop(model, config)
    batch = _on(tm.llava_batch(PROMPTS), device)
    out = greedy(model, batch, STEPS)
    _REPLAY["kept"] = get_drop_record(model).kept_visual_indices
    dropped = any(len(kept[-1]) < len(kept[0]) for kept in _REPLAY["kept"])
    apply_pyramid_drop(model, replace(config, method="replay_for_gpu_checks"))
    prompt_length = batch["input_ids"].shape[1]
    tokens_equal, max_diff = True, 0.0
    for step in range(STEPS):
        logits = full_recompute(model, batch, out.sequences, step)
        max_diff = max(max_diff, (logits - out.logits[step]).abs().max().item())
        tokens_equal &= torch.equal(logits.argmax(-1), out.sequences[:, prompt_length + step])
    return {
        "check": "cached decoding = full recompute",
        "dropped": dropped,
        "tokens_equal": bool(tokens_equal),
        "max_abs_logit_diff": max_diff,
        "passed": bool(dropped and tokens_equal and max_diff < TOLERANCE),
    }


def correctness_checks(device: str) -> list[dict]:
    checks = []
    with exact_float32():
        for attn in ("sdpa", "eager"):
            for position_mode in ("compact", "original"):
                for check in (padded_batch_equals_samples_alone, cached_decoding_equals_full_recompute):
                    result = check(attn, position_mode, device)
                    checks.append({"attn": attn, "position_mode": position_mode, **result})
    return checks


# -- the video path: `pdrop show --video` with real processors ----------------------------------------------
TEMPLATE = (
    "{% for m in messages %}USER: {% for c in m['content'] %}{% if c['type'] == 'video' %}VIDEO "
    "{% elif c['type'] == 'image' %}IMAGE {% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %} ASSISTANT:"
)
VIDEO_RATIOS = [0.5, 0.25]  # drops after layers 2 and 4 of 6, every frame ranked on its own


def _word_tokenizer(special: dict[str, int]):
    """A word-level tokenizer over the tiny models' vocabulary, with the processor's special tokens at the ids
    the model config names."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(4, tm.IMAGE_TOKEN_ID)]
    vocab = {word: index for index, word in enumerate(words)} | special
    vocab |= {word: index for index, word in enumerate(["USER", ":", "ASSISTANT", "what", "?"], start=110)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(special)})
    return tokenizer


def save_tiny_qwen2_vl(directory: Path) -> None:
    """Tiny Qwen2-VL (2 px patches merged 2x2, 2 frames per temporal patch) with its processor."""
    from transformers import Qwen2VLProcessor, Qwen2VLVideoProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    special = {
        "<|image_pad|>": tm.IMAGE_TOKEN_ID,
        "<|video_pad|>": tm.VIDEO_TOKEN_ID,
        "<|vision_start|>": tm.VISION_START_ID,
        "<|vision_end|>": tm.VISION_END_ID,
    }
    sizes = dict(patch_size=2, merge_size=2, temporal_patch_size=2, size={"shortest_edge": 64, "longest_edge": 1024})
    template = TEMPLATE.replace("VIDEO", "<|vision_start|><|video_pad|><|vision_end|>")
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessorPil(**sizes),
        tokenizer=_word_tokenizer(special),
        video_processor=Qwen2VLVideoProcessor(**sizes),
        chat_template=template.replace("IMAGE", "<|vision_start|><|image_pad|><|vision_end|>"),
    )
    tm.tiny_qwen2_vl().save_pretrained(directory)
    processor.save_pretrained(directory)


def save_tiny_onevision(directory: Path) -> None:
    """Tiny LLaVA-OneVision (28 px frames, 16 patches pooled to 4 tokens per frame) with its processor."""
    from transformers import LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    side = tm.ONEVISION_SIZE
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessorPil(
            size={"height": side, "width": side}, image_grid_pinpoints=[[28, 56], [56, 28], [56, 56]]
        ),
        tokenizer=_word_tokenizer({"<image>": tm.IMAGE_TOKEN_ID, "<video>": tm.VIDEO_TOKEN_ID}),
        video_processor=LlavaOnevisionVideoProcessor(size={"height": side, "width": side}),
        num_image_tokens=(side // 7) ** 2,
        vision_feature_select_strategy="default",
        chat_template=TEMPLATE.replace("VIDEO", "<video>").replace("IMAGE", "<image>"),
    )
    tm.tiny_llava_onevision().save_pretrained(directory)
    processor.save_pretrained(directory)


def _save_clip(path: Path, frames: int, side: int) -> None:
    from PIL import Image

    pictures = [Image.new("RGB", (side, side), (30 * i % 256, 255 - 30 * i % 256, 90)) for i in range(frames)]
    pictures[0].save(path, save_all=True, append_images=pictures[1:], duration=100)


def show_video(model_dir: Path, clip: Path, picture: Path, frames: int) -> list[list[int]]:
    """`pdrop show --video` as a user types it; returns the kept counts per stage and frame it prints."""
    from pyramiddrop.cli import main

    args = ["show", "--model", str(model_dir), "--video", str(clip), "--prompt", "what ?", "--out", str(picture)]
    args += ["--frames", str(frames), "--video-pool", "frame", "--position-mode", "original"]
    args += ["--layer-list", "2", "4", "--ratios", *map(str, VIDEO_RATIOS)]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        main(args)
    line = next(line for line in printed.getvalue().splitlines() if line.startswith("kept tokens per stage"))
    return ast.literal_eval(line.split(": ", 1)[1].split("; wrote")[0])


def video_checks(out: Path) -> list[dict]:
    """Both families through the command line; stage s must keep max(int(n * ratio_s), 1) of each frame's n.
    The frame strips are written to `out` as `video_<family>.png`."""
    checks = []
    families = [("qwen2_vl", save_tiny_qwen2_vl, 32), ("llava_onevision", save_tiny_onevision, tm.ONEVISION_SIZE)]
    for family, save, side in families:
        strip = out / f"video_{family}.png"
        strip.unlink(missing_ok=True)
        with tempfile.TemporaryDirectory() as folder:
            folder = Path(folder)
            save(folder / "model")
            _save_clip(folder / "clip.gif", 8, side)
            counts = show_video(folder / "model", folder / "clip.gif", strip, 8)
        drawn = strip.stat().st_size if strip.exists() else 0
        first = counts[0]
        expected = [first] + [[max(int(n * ratio), 1) for n in first] for ratio in VIDEO_RATIOS]
        checks.append(
            {
                "check": f"pdrop show --video, {family}",
                "kept_per_stage_and_frame": counts,
                "expected": expected,
                "strip": strip.name,
                "strip_png_bytes": drawn,
                "passed": bool(counts == expected and len(first) > 1 and drawn > 0),
            }
        )
    return checks
