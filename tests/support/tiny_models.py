"""Tiny random-weight vision-language models (LLaVA, LLaVA-NeXT, LLaVA-OneVision, Qwen2/2.5/3-VL) and batches,
built from configs (float32, CPU)."""

from __future__ import annotations

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
)

IMAGE_TOKEN_ID = 100
PAD_ID = 0
VOCAB = 128


def text_fields(num_layers: int = 6, kv_heads: int = 2, **extra) -> dict:
    """The tiny language model of every family (64 wide, 4 query heads); `extra` adds or overrides fields."""
    return (
        dict(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=num_layers,
            num_attention_heads=4,
            num_key_value_heads=kv_heads,
            max_position_embeddings=512,
            pad_token_id=PAD_ID,
            bos_token_id=1,
            eos_token_id=None,
        )
        | extra
    )


def vision_fields(image_size, num_layers: int = 1, **extra) -> dict:
    """The tiny vision tower of the ViT-style families (32 wide, 2 heads, 7 px patches)."""
    return (
        dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=num_layers,
            num_attention_heads=2,
            image_size=image_size,
            patch_size=7,
        )
        | extra
    )


def _text_config(num_layers: int, kv_heads: int) -> LlamaConfig:
    return LlamaConfig(**text_fields(num_layers, kv_heads))


def _vision_config(image_size: int) -> CLIPVisionConfig:
    return CLIPVisionConfig(**vision_fields(image_size, num_layers=2))


def _finish(model: torch.nn.Module, attn: str, text_only_output: bool = False) -> torch.nn.Module:
    # Larger weights than the default init separate the logits, so greedy tokens are stable under rounding.
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() == 2 and "vision_tower" not in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.15)
        if text_only_output:  # never generate a visual placeholder: a re-run over the output would expect pixels
            model.lm_head.weight[IMAGE_TOKEN_ID:] = 0
    model.set_attn_implementation(attn)
    return model.eval()


def tiny_llava(
    attn: str = "sdpa",
    kv_heads: int = 4,
    num_layers: int = 6,
    seed: int = 0,
    text_only_output: bool = False,
    image_size: int = 56,
) -> LlavaForConditionalGeneration:
    """64 visual tokens per image (56 px, patch 7, CLS dropped; `(image_size / 7) ** 2` for other sizes)."""
    torch.manual_seed(seed)
    config = LlavaConfig(
        vision_config=_vision_config(image_size),
        text_config=_text_config(num_layers, kv_heads),
        image_token_id=IMAGE_TOKEN_ID,
        projector_hidden_act="gelu",
    )
    return _finish(LlavaForConditionalGeneration(config), attn, text_only_output)


def tiny_llava_next(attn: str = "sdpa", kv_heads: int = 2, seed: int = 0) -> LlavaNextForConditionalGeneration:
    """Anyres with 28 px crops (16 tokens each) and a 2x2 grid at most: token counts differ per image size."""
    torch.manual_seed(seed)
    config = LlavaNextConfig(
        vision_config=_vision_config(28),
        text_config=_text_config(6, kv_heads),
        image_token_id=IMAGE_TOKEN_ID,
        image_grid_pinpoints=[[28, 56], [56, 28], [56, 56]],
        projector_hidden_act="gelu",
    )
    return _finish(LlavaNextForConditionalGeneration(config), attn)


def llava_batch(prompts: list[tuple[int, int, int]], num_visual: int = 64, seed: int = 0, padding: str = "left"):
    """One sample per (prefix, images, suffix): text ids around `images` blocks of image tokens, padded."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for prefix, images, suffix in prompts:
        ids = [1] + torch.randint(2, IMAGE_TOKEN_ID, (prefix,), generator=generator).tolist()
        for _ in range(images):
            ids += [IMAGE_TOKEN_ID] * num_visual + torch.randint(2, IMAGE_TOKEN_ID, (2,), generator=generator).tolist()
        ids += torch.randint(2, IMAGE_TOKEN_ID, (suffix,), generator=generator).tolist()
        rows.append(ids)
    input_ids, attention_mask = pad(rows, padding)
    num_images = sum(images for _, images, _ in prompts)
    pixel_values = torch.randn(num_images, 3, 56, 56, generator=generator)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if num_images:
        batch["pixel_values"] = pixel_values
    return batch


def pad(rows: list[list[int]], padding: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), length), PAD_ID)
    attention_mask = torch.zeros(len(rows), length, dtype=torch.long)
    for index, row in enumerate(rows):
        span = slice(length - len(row), length) if padding == "left" else slice(0, len(row))
        input_ids[index, span] = torch.tensor(row)
        attention_mask[index, span] = 1
    return input_ids, attention_mask


def sample(batch: dict, index: int, num_visual: int = 64) -> dict:
    """Sample `index` of a LLaVA batch on its own, without padding."""
    keep = batch["attention_mask"][index].bool()
    ids = batch["input_ids"][index][keep][None]
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    images_before = int((batch["input_ids"][:index] == IMAGE_TOKEN_ID).sum()) // num_visual
    images = int((ids == IMAGE_TOKEN_ID).sum()) // num_visual
    if images:
        out["pixel_values"] = batch["pixel_values"][images_before : images_before + images]
    return out


def multi_turn_batch() -> tuple[dict, list[list[tuple[int, int]]]]:
    """A right-padded training batch for the tiny LLaVA with labels on answer spans, and the spans: sample 0 has two
    (two turns), sample 1 one, sample 2 none (not dropped)."""
    image = [IMAGE_TOKEN_ID] * 64
    rows = [[1, 5] + image + [6, 7, 20, 21, 8, 9, 22], [1, 5, 6] + image + [7, 8, 23, 24], [1, 5] + image + [6, 7]]
    answers = [[(68, 70), (72, 73)], [(69, 71)], []]
    input_ids, attention_mask = pad(rows, "right")
    labels = torch.full_like(input_ids, -100)
    for row, spans in enumerate(answers):
        for start, end in spans:
            labels[row, start:end] = input_ids[row, start:end]
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "pixel_values": torch.randn(3, 3, 56, 56),
        "labels": labels,
    }, answers


def language_model_input(model, batch: dict) -> torch.Tensor:
    """The embeddings a LLaVA model's language model receives (image features scattered in), from a plain forward."""
    seen = {}
    handle = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.update(embeds=kwargs["inputs_embeds"]), with_kwargs=True
    )
    with torch.no_grad():
        model(**batch)
    handle.remove()
    return seen["embeds"]


def save_tiny_llava_with_processor(directory) -> None:
    """A tiny LLaVA plus a word-level tokenizer and a PIL CLIP image processor, loadable by the Auto classes."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(4, IMAGE_TOKEN_ID)]
    vocab = {word: index for index, word in enumerate(words)} | {"<image>": IMAGE_TOKEN_ID}
    vocab |= {word: index for index, word in enumerate(["USER", ":", "ASSISTANT", "what", "?"], start=101)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_processor = CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=7,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template="{% for m in messages %}USER: {% for c in m['content'] %}{% if c['type'] == 'image' %}<image> "
        "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %} ASSISTANT:",
    )
    model = tiny_llava()
    model.config.pad_token_id = PAD_ID
    model.save_pretrained(directory)
    processor.save_pretrained(directory)


# -- Qwen2-VL / Qwen2.5-VL / Qwen3-VL (M-RoPE) and LLaVA-OneVision ------------------------------------------------
VIDEO_TOKEN_ID = 101
VISION_START_ID = 102
VISION_END_ID = 103
PATCH_FEATURES = 3 * 2 * 2 * 2  # channels x temporal patch x patch x patch, the Qwen vision input per patch


def _qwen_text(num_layers: int, kv_heads: int, mrope_section: list[int], **extra) -> dict:
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope_section}
    return text_fields(num_layers, kv_heads, rope_parameters=rope, **extra)


def _qwen_ids() -> dict:
    return dict(
        image_token_id=IMAGE_TOKEN_ID,
        video_token_id=VIDEO_TOKEN_ID,
        vision_start_token_id=VISION_START_ID,
        vision_end_token_id=VISION_END_ID,
    )


def tiny_qwen2_vl(attn: str = "sdpa", kv_heads: int = 2, sliding_window: int | None = None, seed: int = 0):
    """Qwen2-VL with 2x2-pixel patches merged 2x2: an (h, w) patch grid gives h*w/4 tokens. GQA by default.

    `sliding_window` makes layers 2.. sliding-window layers (`max_window_layers=2`).
    """
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    torch.manual_seed(seed)
    extra = {}
    if sliding_window:
        extra = dict(use_sliding_window=True, sliding_window=sliding_window, max_window_layers=2)
    config = Qwen2VLConfig(
        text_config=_qwen_text(6, kv_heads, [2, 3, 3], **extra),
        vision_config=dict(depth=1, embed_dim=16, hidden_size=64, num_heads=2, patch_size=2),
        **_qwen_ids(),
    )
    return _finish(Qwen2VLForConditionalGeneration(config), attn, text_only_output=True)


def tiny_qwen2_5_vl(attn: str = "sdpa", kv_heads: int = 2, seed: int = 0):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    config = Qwen2_5_VLConfig(
        text_config=_qwen_text(6, kv_heads, [2, 3, 3]),
        vision_config=dict(
            depth=2,
            hidden_size=16,
            intermediate_size=32,
            num_heads=2,
            out_hidden_size=64,
            patch_size=2,
            window_size=8,
            fullatt_block_indexes=[1],
        ),
        **_qwen_ids(),
    )
    return _finish(Qwen2_5_VLForConditionalGeneration(config), attn, text_only_output=True)


def tiny_qwen3_vl(attn: str = "sdpa", kv_heads: int = 2, seed: int = 0, moe: bool = False):
    """Qwen3-VL (interleaved M-RoPE, q/k norms) with DeepStack features added after decoder layers 0 and 1.

    `moe`: Qwen3-VL-MoE (4 experts, 2 per token) instead.
    """
    from transformers import (
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
        Qwen3VLMoeConfig,
        Qwen3VLMoeForConditionalGeneration,
    )

    torch.manual_seed(seed)
    config_class, model_class = Qwen3VLConfig, Qwen3VLForConditionalGeneration
    if moe:
        config_class, model_class = Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration
    extra = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32) if moe else {}
    config = config_class(
        text_config=_qwen_text(6, kv_heads, [4, 2, 2], head_dim=16, **extra),
        vision_config=dict(
            depth=2,
            hidden_size=16,
            intermediate_size=32,
            num_heads=2,
            out_hidden_size=64,
            patch_size=2,
            num_position_embeddings=16,
            deepstack_visual_indexes=[0, 1],
        ),
        **_qwen_ids(),
    )
    return _finish(model_class(config), attn, text_only_output=True)


def qwen_sample(segments: list, seed: int = 0, frame_blocks: bool = False) -> dict:
    """One unpadded sample: `segments` are text lengths (random ids), `("image", h, w)` or `("video", t, h, w)`
    patch grids (before the 2x2 merge). `frame_blocks`: each video frame in its own vision_start/end block after a
    timestamp token, as Qwen3-VL's processor lays videos out.
    """
    generator = torch.Generator().manual_seed(seed)
    ids, types, images, videos = [1], [0], [], []

    def text(count: int) -> None:
        ids.extend(torch.randint(2, IMAGE_TOKEN_ID, (count,), generator=generator).tolist())
        types.extend([0] * count)

    def block(token: int, count: int) -> None:
        ids.extend([VISION_START_ID] + [token] * count + [VISION_END_ID])
        types.extend([0] + [1 if token == IMAGE_TOKEN_ID else 2] * count + [0])

    for segment in segments:
        if isinstance(segment, int):
            text(segment)
        elif segment[0] == "image":
            images.append([1, segment[1], segment[2]])
            block(IMAGE_TOKEN_ID, segment[1] * segment[2] // 4)
        else:
            t, h, w = segment[1:]
            videos.append([t, h, w])
            for _ in range(t if frame_blocks else 1):
                if frame_blocks:
                    text(1)
                block(VIDEO_TOKEN_ID, (1 if frame_blocks else t) * h * w // 4)
    out = {
        "input_ids": torch.tensor([ids]),
        "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
        "mm_token_type_ids": torch.tensor([types]),
    }
    if images:
        out["image_grid_thw"] = torch.tensor(images)
        out["pixel_values"] = torch.randn(sum(h * w for _, h, w in images), PATCH_FEATURES, generator=generator)
    if videos:
        out["video_grid_thw"] = torch.tensor(videos)
        out["pixel_values_videos"] = torch.randn(
            sum(t * h * w for t, h, w in videos), PATCH_FEATURES, generator=generator
        )
    return out


def qwen_samples(family: str) -> list[dict]:
    """An image sample, a video sample (4 frames of 16 tokens) and a sample with two images of other sizes."""
    blocks = family.startswith("qwen3")  # Qwen3-VL's processor puts every frame in its own block after a timestamp
    return [
        qwen_sample([3, ("image", 8, 8), 4], seed=1, frame_blocks=blocks),
        qwen_sample([2, ("video", 4, 8, 8), 2], seed=2, frame_blocks=blocks),
        qwen_sample([1, ("image", 8, 12), 2, ("image", 4, 8), 5], seed=3, frame_blocks=blocks),
    ]


def collate(samples: list[dict], padding: str = "left") -> dict:
    """Pad unpadded samples into one batch; per-image tensors (pixel values, grids, sizes) are concatenated."""
    input_ids, attention_mask = pad([s["input_ids"][0].tolist() for s in samples], padding)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if "mm_token_type_ids" in samples[0]:
        batch["mm_token_type_ids"] = pad([s["mm_token_type_ids"][0].tolist() for s in samples], padding)[0]
    for key in ["pixel_values", "image_grid_thw", "image_sizes", "pixel_values_videos", "video_grid_thw"]:
        parts = [s[key] for s in samples if key in s]
        if parts:
            batch[key] = torch.cat(parts)
    return batch


ONEVISION_SIZE = 28  # crop size in pixels: 4x4 patches of 7 px, 16 tokens per crop, 4 per video frame (2x2 pooled)


def tiny_llava_onevision(attn: str = "sdpa", kv_heads: int = 2, seed: int = 0, size: int = ONEVISION_SIZE):
    """LLaVA-OneVision on a Qwen2 language model: anyres images (grid up to 2x2 crops) and videos.

    `size`: the crop size in pixels (a video frame has `ceil(size / 14) ** 2` tokens: 4 at 28 px, 16 at 56 px).
    """
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    torch.manual_seed(seed)
    config = LlavaOnevisionConfig(
        vision_config=_vision_config(size),
        text_config=text_fields(6, kv_heads, model_type="qwen2"),
        image_token_id=IMAGE_TOKEN_ID,
        video_token_id=VIDEO_TOKEN_ID,
        image_grid_pinpoints=[[size, 2 * size], [2 * size, size], [2 * size, 2 * size]],
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
    )
    return _finish(LlavaOnevisionForConditionalGeneration(config), attn, text_only_output=True)


def onevision_sample(model, prefix: int, visual: tuple, suffix: int, seed: int = 0) -> dict:
    """One unpadded sample: `visual` is `("image", height, width)` (anyres, 5 crops padded) or `("video", frames)`."""
    generator = torch.Generator().manual_seed(seed)
    ids = [1] + torch.randint(2, IMAGE_TOKEN_ID, (prefix,), generator=generator).tolist()
    out = {}
    if visual[0] == "image":
        out["image_sizes"] = torch.tensor([visual[1:]])
        out["pixel_values"] = torch.randn(1, 5, 3, ONEVISION_SIZE, ONEVISION_SIZE, generator=generator)
        with torch.no_grad():
            features = model.model.get_image_features(out["pixel_values"], out["image_sizes"]).pooler_output
        ids += [IMAGE_TOKEN_ID] * len(features[0])
    else:
        frames = visual[1]
        out["pixel_values_videos"] = torch.randn(1, frames, 3, ONEVISION_SIZE, ONEVISION_SIZE, generator=generator)
        ids += [VIDEO_TOKEN_ID] * (frames * 4 + 1)  # 2x2 pooled frames, then one newline
    ids += torch.randint(2, IMAGE_TOKEN_ID, (suffix,), generator=generator).tolist()
    out["input_ids"] = torch.tensor([ids])
    out["attention_mask"] = torch.ones(1, len(ids), dtype=torch.long)
    return out
