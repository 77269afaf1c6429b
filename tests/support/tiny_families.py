"""Tiny random-weight InternVL, Mistral 3, Idefics3, SmolVLM, Gemma 3 and LLaVA-NeXT-Video models, each with its
own processor class (PIL image processor, a word-level tokenizer with the family's special tokens): the inputs of
the family tests come from the real processors, so the token layout (tiles and thumbnails, `<img>`/`</img>`, row
breaks, sub-images, pan-and-scan crops) is the processor's, not a hand-built copy of it."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tiny_models import _finish, _text_config, _vision_config, text_fields, vision_fields
from tiny_processors import (
    chat_template,
    image_only,
    llava_next_image_processor,
    llava_processor_kwargs,
    word_tokenizer,
)


def _llama_text(num_layers: int = 6, kv_heads: int = 2) -> dict:
    return _text_config(num_layers, kv_heads).to_dict()


@dataclass
class Family:
    """A tiny model builder and its processor; `image_sizes` are (width, height) of test images: two of different
    sizes (the processor splits them into different tile / row counts)."""

    name: str
    build: object  # (attn) -> model
    processor: object  # () -> processor
    image_sizes: list = field(default_factory=lambda: [(56, 56), (112, 56)])
    video: bool = False


# -- InternVL (Qwen2 or Qwen3 text) -------------------------------------------------------------------------------
INTERNVL_TOKENS = ["<IMG_CONTEXT>", "<img>", "</img>", "<video>"]


def tiny_internvl(attn: str = "sdpa", text: str = "qwen2", seed: int = 0):
    """56 px tiles of 8x8 patches, pixel-shuffled 2x2: 16 context tokens per tile (and per thumbnail)."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    torch.manual_seed(seed)
    extra = dict(head_dim=16) if text == "qwen3" else {}
    config = InternVLConfig(
        vision_config=vision_fields([56, 56], patch_size=[7, 7]),
        text_config=text_fields(model_type=text, **extra),
        image_token_id=100,
        image_seq_length=16,
    )
    return _finish(InternVLForConditionalGeneration(config), attn, text_only_output=True)


def internvl_processor():
    from transformers import GotOcr2ImageProcessorPil, InternVLProcessor

    named = dict(zip(["context_image_token", "start_image_token", "end_image_token", "video_token"], INTERNVL_TOKENS))
    tokenizer = word_tokenizer(INTERNVL_TOKENS, named)
    images = GotOcr2ImageProcessorPil(size={"height": 56, "width": 56}, crop_to_patches=True, max_patches=4)
    return image_only(InternVLProcessor)(
        images, tokenizer, image_seq_length=16, chat_template=chat_template("<IMG_CONTEXT>")
    )


# -- Mistral 3 (Pixtral vision) --------------------------------------------------------------------------------
PIXTRAL_TOKENS = ["[IMG]", "[IMG_BREAK]", "[IMG_END]"]


def tiny_mistral3(attn: str = "sdpa", seed: int = 0, sliding_window: int | None = None, text: str = "mistral"):
    """Patches of 7 px merged 2x2: a 56x112 image is 4 rows of 8 `[IMG]` tokens, each row ended by a break."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    torch.manual_seed(seed)
    extra = dict(head_dim=16, sliding_window=sliding_window)
    if text == "ministral3":
        extra["rope_parameters"] = dict(
            rope_type="default", rope_theta=10000.0, llama_4_scaling_beta=0.1, original_max_position_embeddings=512
        )
    config = Mistral3Config(
        vision_config=vision_fields(112, head_dim=16),
        text_config=text_fields(model_type=text, **extra),
        image_token_index=100,
        spatial_merge_size=2,
    )
    return _finish(Mistral3ForConditionalGeneration(config), attn, text_only_output=True)


class PixtralLayout:
    """Mistral 3's processor stand-in: PixtralProcessor cannot even be imported without torchvision, so this applies
    its documented layout (each row of `[IMG]` ends in `[IMG_BREAK]`, the last in `[IMG_END]`) to the sizes its PIL
    image processor returns. The only family whose layout is not the real processor's."""

    merged_patch = 14  # patch 7, merged 2x2

    def __init__(self) -> None:
        from transformers import PixtralImageProcessorPil

        self.image_processor = PixtralImageProcessorPil(size={"longest_edge": 112}, patch_size=self.merged_patch)
        self.tokenizer = word_tokenizer(PIXTRAL_TOKENS)
        self.chat_template = chat_template("[IMG]")

    def __call__(self, text, images=None, return_tensors="pt", padding=True):
        pixels = self.image_processor(images, return_tensors="pt") if images else {}
        sizes = iter(pixels["image_sizes"].tolist() if images else [])
        expanded = []
        for prompt in text:
            parts = prompt.split("[IMG]")
            out = parts[0]
            for part in parts[1:]:
                height, width = next(sizes)
                rows = [["[IMG]"] * (width // self.merged_patch) + ["[IMG_BREAK]"]] * (height // self.merged_patch)
                tokens = [token for row in rows for token in row]
                out += "".join(tokens[:-1] + ["[IMG_END]"]) + part
            expanded.append(out)
        batch = dict(self.tokenizer(expanded, return_tensors=return_tensors, padding=padding))
        return batch | dict(pixels)


def mistral3_processor():
    return PixtralLayout()


def pixtral_processor():
    """The real PixtralProcessor (needs torchvision; tests/processors/ checks PixtralLayout against it) on the
    torchvision PixtralImageProcessor, with the stand-in's sizes."""
    from transformers import PixtralImageProcessor, PixtralProcessor

    images = PixtralImageProcessor(size={"longest_edge": 112}, patch_size=PixtralLayout.merged_patch)
    return PixtralProcessor(
        images, word_tokenizer(PIXTRAL_TOKENS), patch_size=7, spatial_merge_size=2, chat_template=chat_template("[IMG]")
    )


# -- Idefics3 / SmolVLM -----------------------------------------------------------------------------------------
IDEFICS_TOKENS = ["<image>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>"] + [
    f"<row_{row}_col_{col}>" for row in range(1, 4) for col in range(1, 4)
]


def tiny_idefics3(attn: str = "sdpa", seed: int = 0, smolvlm: bool = False):
    """56 px sub-images of 8x8 patches, pixel-shuffled 2x2: 16 `<image>` tokens per sub-image and global image."""
    import transformers

    prefix = "SmolVLM" if smolvlm else "Idefics3"
    torch.manual_seed(seed)
    config = getattr(transformers, f"{prefix}Config")(
        vision_config=vision_fields(56),
        text_config=_llama_text(),
        image_token_id=100,
        scale_factor=2,
    )
    model = getattr(transformers, f"{prefix}ForConditionalGeneration")(config)
    return _finish(model, attn, text_only_output=True)


def idefics3_processor(smolvlm: bool = False):
    """The family's processor and PIL image processor: images resized to at most 112 px, split into 56 px
    sub-images plus a global one."""
    import transformers

    prefix = "SmolVLM" if smolvlm else "Idefics3"
    images = getattr(transformers, f"{prefix}ImageProcessorPil")(
        do_image_splitting=True, size={"longest_edge": 112}, max_image_size={"longest_edge": 56}
    )
    tokenizer = word_tokenizer(IDEFICS_TOKENS)
    if not smolvlm:
        return transformers.Idefics3Processor(
            images, tokenizer, image_seq_len=16, chat_template=chat_template("<image>")
        )
    from transformers.models.smolvlm import processing_smolvlm

    if processing_smolvlm.num2words is None:  # not in the lock; SmolVLM only spells out video frame counts with it
        processing_smolvlm.num2words = _video_prompts_need_num2words
    processor = image_only(transformers.SmolVLMProcessor)(
        images, tokenizer, None, image_seq_len=16, chat_template=chat_template("<image>")
    )
    processor.images_per_prompt = True  # it takes one list of images per prompt
    return processor


def _video_prompts_need_num2words(number: int) -> str:
    raise ImportError("SmolVLM video prompts need the `num2words` package; these tests give it images only.")


# -- LLaVA-NeXT-Video ------------------------------------------------------------------------------------------
NEXT_VIDEO_TOKENS = ["<image>", "<video>"]


def tiny_llava_next_video(attn: str = "sdpa", seed: int = 0):
    """Anyres images as tiny LLaVA-NeXT (28 px crops, 16 tokens each, newline per row) and videos of 28 px frames
    pooled 2x2: 4 tokens per frame."""
    from transformers import LlavaNextVideoConfig, LlavaNextVideoForConditionalGeneration

    torch.manual_seed(seed)
    config = LlavaNextVideoConfig(
        vision_config=_vision_config(28).to_dict(),
        text_config=_llama_text(),
        image_token_index=100,
        video_token_index=101,
        image_grid_pinpoints=[[28, 56], [56, 28], [56, 56]],
        projector_hidden_act="gelu",
        spatial_pool_stride=2,
    )
    return _finish(LlavaNextVideoForConditionalGeneration(config), attn, text_only_output=True)


def llava_next_video_processor():
    from transformers import LlavaNextVideoProcessor

    named = {"image_token": "<image>", "video_token": "<video>"}
    tokenizer = word_tokenizer(NEXT_VIDEO_TOKENS, named)
    return image_only(LlavaNextVideoProcessor)(
        None, llava_next_image_processor(), tokenizer, **llava_processor_kwargs()
    )


# -- Gemma 3 ---------------------------------------------------------------------------------------------------
GEMMA3_TOKENS = ["<image_soft_token>", "<start_of_image>", "<end_of_image>"]
GEMMA3_LAYERS = ["sliding_attention", "sliding_attention", "full_attention"] * 2


def tiny_gemma3(attn: str = "sdpa", seed: int = 0, sliding_window: int = 12, **text_extra):
    """SigLIP 56 px images of 8x8 patches pooled to 16 soft tokens, one bidirectional block per image (and per
    pan-and-scan crop); text layers sliding (window 12, rotary base 1e4) and global (base 1e6) interleaved."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    torch.manual_seed(seed)
    text = text_fields(model_type="gemma3_text", head_dim=16, query_pre_attn_scalar=16, sliding_window=sliding_window)
    text |= dict(layer_types=GEMMA3_LAYERS, **text_extra)
    config = Gemma3Config(
        vision_config=vision_fields(56),
        text_config=text,
        mm_tokens_per_image=16,
        image_token_index=100,
        boi_token_index=101,
        eoi_token_index=102,
        tie_word_embeddings=False,
    )
    return _finish(Gemma3ForConditionalGeneration(config), attn, text_only_output=True)


def gemma3_processor():
    """Gemma3Processor with pan-and-scan: a wide image gets the original plus crops, each its own image block."""
    from transformers import Gemma3ImageProcessorPil, Gemma3Processor

    named = dict(zip(["image_token", "boi_token", "eoi_token"], GEMMA3_TOKENS))
    images = Gemma3ImageProcessorPil(size={"height": 56, "width": 56})
    processor = Gemma3Processor(
        images,
        word_tokenizer(GEMMA3_TOKENS, named),
        image_seq_length=16,
        chat_template=chat_template("<start_of_image>"),
    )
    processor.images_per_prompt = True  # it takes one list of images per prompt
    # The class defaults (pan-and-scan off, 256 px crops) override the image processor's: set them as a user would.
    processor.images_kwargs = Gemma3Processor.images_kwargs | dict(
        do_pan_and_scan=True, pan_and_scan_min_crop_size=28, pan_and_scan_max_num_crops=2
    )
    return processor


FAMILIES = {
    "internvl": Family("internvl", tiny_internvl, internvl_processor),
    "internvl_qwen3": Family(
        "internvl_qwen3", lambda attn="sdpa": tiny_internvl(attn, text="qwen3"), internvl_processor
    ),
    "mistral3": Family("mistral3", tiny_mistral3, mistral3_processor, image_sizes=[(56, 56), (112, 70)]),
    "idefics3": Family("idefics3", tiny_idefics3, idefics3_processor),
    "smolvlm": Family(
        "smolvlm",
        lambda attn="sdpa": tiny_idefics3(attn, smolvlm=True),
        lambda: idefics3_processor(smolvlm=True),
    ),
    "gemma3": Family("gemma3", tiny_gemma3, gemma3_processor, [(56, 56), (112, 56)]),
    "llava_next_video": Family(
        "llava_next_video", tiny_llava_next_video, llava_next_video_processor, [(28, 28), (56, 50)], True
    ),
}
