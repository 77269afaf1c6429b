"""What every tool feeds a model: loading it, prompts through the chat template, batches of images and questions,
visual-token counts through the family's adapter, JSONL question files, images and video frames, and switching a
model's drop settings between rows.

The tools (evaluate, study, show, tune) and the command line take their inputs from here, so a prompt is written
the same way everywhere (the harness integrations use `chat_prompt` too) and answers match between them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from pyramiddrop import PyramidDropConfig, apply_pyramid_drop, is_pyramid_drop_applied, remove_pyramid_drop
from pyramiddrop.adapters import get_adapter, placeholder_mask

VIDEO_FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def load_model(name: str, attn: str | None = None, dtype: str = "float32"):
    """Processor and model through the Auto classes: a hub id or a local directory."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(name)
    model = AutoModelForImageTextToText.from_pretrained(
        name, dtype=getattr(torch, dtype), attn_implementation=attn
    ).eval()
    return processor, model


def use_drop(model, config: PyramidDropConfig | None) -> None:
    """Make `model` drop with `config` from now on (None: the unmodified model), whatever it did before."""
    if is_pyramid_drop_applied(model):
        remove_pyramid_drop(model)
    if config is not None:
        apply_pyramid_drop(model, config)


def chat_prompt(processor: Any, parts: list[dict]) -> str:
    """One user turn of `parts` (`{"type": "image"}` / `{"type": "text", "text": ...}`, in order), with the
    generation prompt; LLaVA's `USER: <image>\\n... ASSISTANT:` for processors without a chat template."""
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": parts}]
        return processor.apply_chat_template(messages, add_generation_prompt=True)
    image_token = getattr(processor, "image_token", None) or "<image>"
    body = "".join(f"{image_token}\n" if part["type"] == "image" else part["text"] for part in parts)
    return f"USER: {body} ASSISTANT:"


def build_inputs(processor, images: list, prompts: list[str]) -> dict:
    """Chat-template prompts with one image each, left-padded as `generate()` expects."""
    texts = [chat_prompt(processor, [{"type": "image"}, {"type": "text", "text": prompt}]) for prompt in prompts]
    processor.tokenizer.padding_side = "left"
    return dict(processor(images=images, text=texts, return_tensors="pt", padding=True))


def build_video_inputs(processor, frames: list, prompt: str) -> dict:
    """A chat-template prompt with one video (its frames as PIL images), through the processor's video path."""
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": prompt}]}]
    try:
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = dict(processor(videos=[frames], text=[text], return_tensors="pt"))
    except ImportError as error:  # transformers' video processors are written on torchvision
        raise ValueError(
            f"this processor's video path needs a package that is missing ({error}); install torchvision matching "
            "your torch, or draw an image instead."
        ) from error
    if "pixel_values_videos" not in inputs:  # e.g. LlavaProcessor ignores videos without a word
        raise ValueError(
            f"{type(processor).__name__} takes no videos; use a video model (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, "
            "LLaVA-OneVision) or draw an image instead."
        )
    return inputs


def follow_up_ids(processor, history: list[dict], question: str, sequences: torch.Tensor) -> torch.Tensor:
    """The tokens of a new user turn (and the generation prompt) after the conversation so far."""
    if not getattr(processor, "chat_template", None):
        raise ValueError("a follow-up needs a processor with a chat template (to write the next turn).")
    before = processor.apply_chat_template(history)
    after = processor.apply_chat_template(
        [*history, {"role": "user", "content": [{"type": "text", "text": question}]}], add_generation_prompt=True
    )
    if not after.startswith(before):
        raise ValueError("this chat template rewrites earlier turns; a cache cannot be continued.")
    tokenizer = processor.tokenizer
    ids = tokenizer(after[len(before) :], add_special_tokens=False, return_tensors="pt").input_ids
    eos = tokenizer.eos_token
    if eos and before.endswith(eos) and int(sequences[0, -1]) != tokenizer.eos_token_id:  # stopped at max tokens
        ids = torch.cat([torch.tensor([[tokenizer.eos_token_id]]), ids], 1)
    return ids


def visual_token_mask(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Where the visual placeholders are (every image and video id the model's family declares), `[batch, seq]`."""
    adapter = get_adapter(model)
    return placeholder_mask(model, adapter.placeholder_ids(model), input_ids, None)


def count_visual_tokens(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Visual placeholders per row, `[batch]` (the N that budgets and FLOPs are counted in)."""
    return visual_token_mask(model, input_ids).sum(1)


def load_jsonl(path: str | Path) -> list[dict]:
    """`{"image": path, "question": ..., "answer": ...}` per line; image paths are relative to the file.

    Without any `answer` (every line), the set is label-free: `evaluate` then reports loyalty to no drop only.
    """
    path = Path(path)
    examples, answered = [], []
    for line_number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            example = json.loads(line)
        except json.JSONDecodeError:
            example = None
        if not isinstance(example, dict):
            raise ValueError(
                f"{path}:{line_number}: not a JSON object; each line needs image, question, answer, as "
                '{"image": "a.png", "question": "...", "answer": "..."}.'
            )
        missing = {"image", "question"} - set(example)
        if missing:
            raise ValueError(
                f"{path}:{line_number}: missing keys {sorted(missing)}; each line needs image and question (and "
                "answer, for accuracy)."
            )
        answered.append((line_number, "answer" in example))
        image = (path.parent / example["image"]).resolve()
        if not image.is_file():
            raise ValueError(
                f"{path}:{line_number}: the image {example['image']} ({image}) does not exist; image paths are "
                "relative to the JSONL file's folder."
            )
        example["image"] = str(image)
        example.setdefault("type", "all")
        examples.append(example)
    with_answer = [number for number, has in answered if has]
    if with_answer and len(with_answer) != len(answered):
        without = next(number for number, has in answered if not has)
        raise ValueError(
            f"{path}:{without}: no answer, but line {with_answer[0]} has one; give every line an answer (accuracy "
            "and loyalty) or none (label-free: loyalty to no drop only)."
        )
    return examples


def open_image(image) -> Image.Image:
    return image if isinstance(image, Image.Image) else Image.open(image).convert("RGB")


def open_video_frames(path, count: int = 8) -> list[Image.Image]:
    """`count` evenly spaced RGB frames of an animated image (GIF, APNG, WebP) or of a folder of frame images
    (sorted by name): PIL reads both, so no video decoder is needed."""
    from PIL import ImageSequence

    path = Path(path)
    if count < 1:
        raise ValueError(f"frames must be at least 1, got {count}.")
    if path.is_dir():
        files = sorted(f for f in path.iterdir() if f.suffix.lower() in VIDEO_FRAME_SUFFIXES)
        frames = [Image.open(f).convert("RGB") for f in files]
    elif path.is_file():
        frames = [frame.convert("RGB") for frame in ImageSequence.Iterator(Image.open(path))]
    else:
        raise FileNotFoundError(f"{path}: no such file or folder; give an animated image or a folder of frames.")
    if not frames:
        raise ValueError(f"{path} holds no frames ({', '.join(VIDEO_FRAME_SUFFIXES)} files or an animated image).")
    if len(frames) <= count:
        return frames
    if count == 1:
        return frames[:1]
    step = (len(frames) - 1) / (count - 1)  # first and last frame included
    return [frames[round(i * step)] for i in range(count)]
