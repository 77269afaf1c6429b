"""Tiny random-weight LLaVA and LLaVA-NeXT models and batches, built from configs (float32, CPU)."""

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


def _text_config(num_layers: int, kv_heads: int) -> LlamaConfig:
    return LlamaConfig(
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


def _vision_config(image_size: int) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=7,
    )


def _finish(model: torch.nn.Module, attn: str) -> torch.nn.Module:
    # Larger weights than the default init separate the logits, so greedy tokens are stable under rounding.
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() == 2 and "vision_tower" not in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.15)
    model.set_attn_implementation(attn)
    return model.eval()


def tiny_llava(
    attn: str = "sdpa", kv_heads: int = 4, num_layers: int = 6, seed: int = 0
) -> LlavaForConditionalGeneration:
    """64 visual tokens per image (56 px, patch 7, CLS dropped)."""
    torch.manual_seed(seed)
    config = LlavaConfig(
        vision_config=_vision_config(56),
        text_config=_text_config(num_layers, kv_heads),
        image_token_id=IMAGE_TOKEN_ID,
        projector_hidden_act="gelu",
    )
    return _finish(LlavaForConditionalGeneration(config), attn)


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
