"""Tiny random-weight LLaVA-1.5, LLaVA-NeXT, Qwen2-VL and Qwen2.5-VL models saved as model directories that vLLM can
serve (config, safetensors, tokenizer, processor), built in the test: language models of 4 layers x 128 wide, 4 heads
of 32 (a head size vLLM's CPU attention supports), 2 KV heads, vocab 128; CLIP 2 layers x 64 wide with 7 px patches
(LLaVA-1.5: 56 px images, 64 image tokens; LLaVA-NeXT: 28 px crops); Qwen2-VL's and Qwen2.5-VL's own 1- and 2-block
towers with 2 px patches merged 2x2."""

from __future__ import annotations

from pathlib import Path

import torch
from tiny_models import IMAGE_TOKEN_ID, VOCAB, text_fields, vision_fields
from tiny_processors import llava_processor


def tiny_llava(num_layers: int = 4, seed: int = 0):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    text = LlamaConfig(**text_fields(num_layers, kv_heads=2, hidden_size=128, intermediate_size=256, vocab_size=VOCAB))
    vision = CLIPVisionConfig(**vision_fields(56, num_layers=2, hidden_size=64, intermediate_size=128))
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN_ID, projector_hidden_act="gelu"
    )
    return _scaled(LlavaForConditionalGeneration(config), seed)


def _scaled(model, seed: int):
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # larger weights than the default init: greedy tokens stable under rounding
        for name, parameter in model.named_parameters():
            if parameter.dim() == 2 and "vision_tower" not in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.15)
        model.lm_head.weight[IMAGE_TOKEN_ID:] = 0  # never generate the image placeholder
    return model.eval()


def save_tiny_llava(directory: Path, num_layers: int = 4, seed: int = 0) -> Path:
    """Saves the model and its processor with transformers' own save_pretrained (flattened CLIP keys)."""
    model = tiny_llava(num_layers, seed)
    model.save_pretrained(directory)
    llava_processor().save_pretrained(directory)
    return directory


def tiny_llava_next(seed: int = 0):
    """LLaVA-NeXT: anyres with 28 px crops (16 tokens each) and a 2x2 grid at most, so token counts differ per image
    size; the same Llama as `tiny_llava`."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    torch.manual_seed(seed)
    text = LlamaConfig(**text_fields(4, kv_heads=2, hidden_size=128, intermediate_size=256, vocab_size=VOCAB))
    vision = CLIPVisionConfig(**vision_fields(28, num_layers=2, hidden_size=64, intermediate_size=128))
    config = LlavaNextConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=IMAGE_TOKEN_ID,
        image_grid_pinpoints=[[28, 56], [56, 28], [56, 56]],
        projector_hidden_act="gelu",
    )
    return _scaled(LlavaNextForConditionalGeneration(config), seed)


def save_tiny_llava_next(directory: Path, seed: int = 0) -> Path:
    from tiny_processors import llava_next_processor

    tiny_llava_next(seed).save_pretrained(directory)
    llava_next_processor().save_pretrained(directory)
    return directory


def save_tiny_qwen(directory: Path, family: str = "qwen2_vl", seed: int = 0) -> Path:
    """Qwen2-VL or Qwen2.5-VL (`family`: the model type; M-RoPE sections 4, 6, 6 of the 16 rotary pairs). The
    processor is saved as its image processor and tokenizer: the tests' processor has no video processor, which
    save_pretrained requires; vLLM and transformers load the pair back as the family's processor (with a default
    video processor, unused)."""
    import transformers
    from tiny_models import _finish, _qwen_ids, _qwen_text
    from tiny_processors import qwen_processor

    torch.manual_seed(seed)
    text = _qwen_text(4, 2, [4, 6, 6], hidden_size=128, intermediate_size=256)
    if family == "qwen2_vl":
        config_class, model_class = transformers.Qwen2VLConfig, transformers.Qwen2VLForConditionalGeneration
        vision = dict(depth=1, embed_dim=16, hidden_size=128, num_heads=2, patch_size=2)
    else:  # qwen2_5_vl: windowed attention in the first block, full in the second
        config_class, model_class = transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLForConditionalGeneration
        vision = dict(depth=2, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=128, patch_size=2)
        vision |= dict(window_size=8, fullatt_block_indexes=[1])
    model = model_class(config_class(text_config=text, vision_config=vision, **_qwen_ids()))
    _finish(model, "sdpa", text_only_output=True).save_pretrained(directory)
    processor = qwen_processor(family)
    processor.image_processor.save_pretrained(directory)
    processor.tokenizer.save_pretrained(directory)
    return directory
