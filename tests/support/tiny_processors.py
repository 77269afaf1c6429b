"""The families' own processor classes on small word-level tokenizers (the family's special tokens get ids from 100
up, text words 4..99, a simple chat template) and PIL image processors (they need no torchvision); test images;
one padded batch from a processor."""

from __future__ import annotations

import torch
from tiny_models import PAD_ID, VOCAB

WORDS = (":", "\n", "user", "assistant")


def chat_template(image: str, video: str = "<video>") -> str:
    """`user: <image> text ... assistant:`, with the family's image (and video) placeholder string."""
    return (
        "{% for m in messages %}{{ m['role'] }}:{% for c in m['content'] %}{% if c['type'] == 'image' %} "
        + image
        + " {% elif c['type'] == 'video' %} "
        + video
        + " {% else %} {{ c['text'] }}{% endif %}{% endfor %}{% endfor %} assistant:"
    )


def word_tokenizer(special: list[str], named: dict[str, str] | None = None, extra_words: tuple[str, ...] = WORDS):
    """`special` tokens get ids 100, 101, ...; `named` maps tokenizer attributes (e.g. `image_token`) to them."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(4, 100 - len(extra_words))] + list(extra_words)
    vocab = {word: index for index, word in enumerate(words)}
    vocab |= {token: 100 + index for index, token in enumerate(special)}
    assert max(vocab.values()) < VOCAB
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(r"[:\n]"), behavior="isolated")]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_special_tokens=named or {},
        padding_side="left",
    )
    tokenizer.add_special_tokens({"additional_special_tokens": special}, replace_extra_special_tokens=False)
    assert tokenizer.pad_token_id == PAD_ID
    return tokenizer


def image_only(processor_class):
    """The family's processor class with its video slot left empty: without torchvision transformers cannot even
    name the video processor base class, so a processor with a video slot refuses to be built. Images and text go
    through the family's own code (token expansion, tiles, thumbnails) unchanged."""

    class ImageOnly(processor_class):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    ImageOnly.__name__ = ImageOnly.__qualname__ = processor_class.__name__
    return ImageOnly


def images(sizes: list, seed: int = 0) -> list:
    """PIL images of the given (width, height) with a few coloured shapes."""
    from PIL import Image, ImageDraw

    generator = torch.Generator().manual_seed(seed)
    out = []
    for width, height in sizes:
        colour = tuple(torch.randint(0, 255, (3,), generator=generator).tolist())
        image = Image.new("RGB", (width, height), colour)
        draw = ImageDraw.Draw(image)
        for _ in range(3):
            x, y = (
                torch.randint(0, width - 8, (1,), generator=generator),
                torch.randint(0, height - 8, (1,), generator=generator),
            )
            fill = tuple(torch.randint(0, 255, (3,), generator=generator).tolist())
            draw.rectangle([int(x), int(y), int(x) + width // 3, int(y) + height // 3], fill=fill)
        out.append(image)
    return out


def processed(processor, texts: list[str], visuals: list[list], model=None) -> dict:
    """One padded batch from the processor: `texts[i]` is a user turn after the images of `visuals[i]`.

    An entry `("video", frames)` is a video of random frames, for LLaVA-NeXT-Video: its video processor needs
    torchvision (and the processor refuses `<video>` without videos), so the prompt gets the model's own count of
    video tokens (frames x pooled grid) as a stand-in word that becomes `video_token_id` after tokenizing, and the
    frames go in as `pixel_values_videos`; images still go through the processor.
    """
    stand_in = "w95"
    prompts, flat, videos, nested = [], [], [], []
    for text, pictures in zip(texts, visuals):
        content = [{"type": "image"} for picture in pictures if not isinstance(picture, tuple)]
        turn = {"role": "user", "content": content + [{"type": "text", "text": text}]}
        # The processor's chat template, rendered by its tokenizer (SmolVLM's processor method reads its video
        # processor even for images); the processor's own call below expands the image tokens.
        prompt = processor.tokenizer.apply_chat_template([turn], chat_template=processor.chat_template, tokenize=False)
        for picture in pictures:
            if isinstance(picture, tuple):
                side = model.config.vision_config.image_size
                per_frame = (side // model.config.vision_config.patch_size // model.config.spatial_pool_stride) ** 2
                prompt = prompt.replace("user:", "user: " + f"{stand_in} " * (picture[1] * per_frame), 1)
                generator = torch.Generator().manual_seed(len(videos))
                videos.append(torch.randn(picture[1], 3, side, side, generator=generator))
            else:
                flat.append(picture)
        nested.append([picture for picture in pictures if not isinstance(picture, tuple)])
        prompts.append(prompt)
    pictures = nested if getattr(processor, "images_per_prompt", False) else flat
    batch = dict(processor(text=prompts, images=pictures if flat else None, return_tensors="pt", padding=True))
    if videos:
        stand_in_id = processor.tokenizer.convert_tokens_to_ids(stand_in)
        batch["input_ids"] = batch["input_ids"].masked_fill(
            batch["input_ids"] == stand_in_id, model.config.video_token_id
        )
        batch["pixel_values_videos"] = torch.stack(videos)
    return batch


# -- processors of the families whose tiny models are in tiny_models.py ---------------------------------------
def llava_processor_kwargs() -> dict:
    """The LLaVA-family processor settings that match the tiny CLIP towers: 7 px patches, CLS dropped."""
    return dict(
        patch_size=7,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=chat_template("<image>"),
    )


def llava_next_image_processor():
    """Anyres with 28 px crops and a 2x2 grid at most, as the tiny LLaVA-NeXT towers expect."""
    from transformers import LlavaNextImageProcessorPil

    return LlavaNextImageProcessorPil(
        size={"shortest_edge": 28},
        crop_size={"height": 28, "width": 28},
        image_grid_pinpoints=[[28, 56], [56, 28], [56, 56]],
    )


def llava_processor():
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    images = CLIPImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    tokenizer = word_tokenizer(["<image>"], {"image_token": "<image>"})
    return LlavaProcessor(images, tokenizer, **llava_processor_kwargs())


def llava_next_processor():
    from transformers import LlavaNextProcessor

    tokenizer = word_tokenizer(["<image>"], {"image_token": "<image>"})
    return LlavaNextProcessor(llava_next_image_processor(), tokenizer, **llava_processor_kwargs())


def onevision_processor():
    from transformers import LlavaOnevisionImageProcessorPil, LlavaOnevisionProcessor

    images = LlavaOnevisionImageProcessorPil(
        size={"height": 28, "width": 28}, image_grid_pinpoints=[[28, 56], [56, 28], [56, 56]]
    )
    named = {"image_token": "<image>", "video_token": "<video>"}
    return image_only(LlavaOnevisionProcessor)(
        images,
        word_tokenizer(["<image>", "<video>"], named),
        None,
        num_image_tokens=17,  # the vision tower's tokens, CLS included ("default" drops it)
        vision_feature_select_strategy="default",
        chat_template=chat_template("<image>"),
    )


QWEN_TOKENS = ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"]


def qwen_processor(family: str):
    """Qwen2/2.5/3-VL processors with 2 px patches merged 2x2; images are resized to 8..32 px squares' area."""
    import transformers

    class_name = {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor"}.get(family, "Qwen3VLProcessor")
    images = transformers.Qwen2VLImageProcessorPil(
        patch_size=2, merge_size=2, temporal_patch_size=2, size={"shortest_edge": 8 * 8, "longest_edge": 32 * 32}
    )
    named = dict(zip(["image_token", "video_token", "vision_start_token", "vision_end_token"], QWEN_TOKENS))
    return image_only(getattr(transformers, class_name))(
        images,
        word_tokenizer(QWEN_TOKENS, named),
        None,
        chat_template=chat_template("<|vision_start|><|image_pad|><|vision_end|>"),
    )
