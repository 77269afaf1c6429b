"""A tiny LLaVA (CLIP vision tower, llava projector, 8-layer Llama with GQA) with its own word-level tokenizer.

Everything is built from the real Hugging Face classes and saved in their formats, so a trained directory
loads offline through `AutoProcessor` / `AutoModelForImageTextToText` exactly like a hub checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from pyramiddrop.synthetic.data import DEFAULT_SCENES, IMAGE_SIZE, Example, build_prompt, vocabulary
from pyramiddrop.synthetic.scene import PATCH as PATCH_SIZE
from pyramiddrop.synthetic.scene import scene_set

NUM_VISUAL_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2  # 144 on the shipped scenes: CLS is dropped ("default" strategy)
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %} "
    "{% else %}ASSISTANT: {{ message['content'] if message['content'] is string "
    "else message['content'][0]['text'] }}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
# The same text with `{% generation %}` around each answer and its </s>, for TRL's `assistant_only_loss=True`
# (the answer-only labels of the recipe, `synthetic/vqa.py`); `processor.chat_template = TRAINING_CHAT_TEMPLATE`.
TRAINING_CHAT_TEMPLATE = CHAT_TEMPLATE.replace(
    "{% else %}ASSISTANT: {{ message['content'] if message['content'] is string "
    "else message['content'][0]['text'] }}</s>{% endif %}",
    "{% else %}ASSISTANT: {% generation %}{{ message['content'] if message['content'] is string "
    "else message['content'][0]['text'] }}</s>{% endgeneration %}{% endif %}",
)


def build_tokenizer(scenes: str = DEFAULT_SCENES) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the synthetic vocabulary; lower-cases, splits on spaces and punctuation."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + vocabulary(scenes))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        padding_side="left",  # batched generation
        model_max_length=512,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return tokenizer


def build_processor(tokenizer: PreTrainedTokenizerFast | None = None, scenes: str = DEFAULT_SCENES) -> LlavaProcessor:
    """LlavaProcessor whose `<image>` expands to one token per patch, with the PIL CLIP image processor."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    size = scene_set(scenes).image_size
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer or build_tokenizer(scenes),
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLS
        chat_template=CHAT_TEMPLATE,
    )


def build_config(
    tokenizer: PreTrainedTokenizerFast,
    hidden_size: int = 128,
    num_layers: int = 8,
    init_std: float = 0.02,
    rope_theta: float = 10000.0,
    scenes: str = DEFAULT_SCENES,
) -> LlavaConfig:
    """~3M parameters: a 4-layer CLIP ViT (patch 16, at the scene set's image size) and a Llama with 4 query / 2 KV
    heads.

    `synthetic_scenes` in the config names the scene set the model is for, so evaluation asks it the right
    questions."""
    spec = scene_set(scenes)
    vision = CLIPVisionConfig(
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        image_size=spec.image_size,
        patch_size=PATCH_SIZE,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
        initializer_range=init_std,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        projector_hidden_act="gelu",
        vision_feature_layer=-1,  # the layer the patch pre-training supervises
        vision_feature_select_strategy="default",
        image_seq_length=spec.visual_tokens,
        tie_word_embeddings=True,
        synthetic_scenes=spec.name,
    )


def build_model(
    seed: int = 0,
    hidden_size: int = 128,
    num_layers: int = 8,
    init_std: float = 0.02,
    rope_theta: float = 10000.0,
    scenes: str = DEFAULT_SCENES,
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A freshly initialised (untrained) model and its processor, for the scene set `scenes`."""
    processor = build_processor(scenes=scenes)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(
        build_config(processor.tokenizer, hidden_size, num_layers, init_std, rope_theta, scenes)
    )
    tokenizer = processor.tokenizer
    generation = model.generation_config
    generation.bos_token_id, generation.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    generation.pad_token_id, generation.max_new_tokens, generation.do_sample = (
        tokenizer.pad_token_id,
        4,
        False,
    )
    return model.eval(), processor


def save(model: LlavaForConditionalGeneration, processor: LlavaProcessor, directory: str | Path) -> None:
    """Model (safetensors) + processor, loadable offline with the Auto classes."""
    model.save_pretrained(directory)
    processor.save_pretrained(directory)


def load(directory: str | Path, dtype: torch.dtype = torch.float32):
    """(model, processor) through the Auto classes, as any user would load it."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(directory)
    model = AutoModelForImageTextToText.from_pretrained(directory, dtype=dtype).eval()
    return model, processor


def scenes_of(model_or_directory) -> str:
    """The scene set a synthetic model was trained on (`synthetic_scenes` in its config; the shipped model, which
    predates the field, is on "shapes")."""
    if isinstance(model_or_directory, (str, Path)):
        config_file = Path(model_or_directory) / "config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        return config.get("synthetic_scenes", DEFAULT_SCENES)
    return getattr(model_or_directory.config, "synthetic_scenes", DEFAULT_SCENES)


def set_rope_theta(model: LlavaForConditionalGeneration, rope_theta: float) -> None:
    """Change the language model's RoPE base in place (config and the rotary module's frequencies).

    With 32-dim heads and the usual base 10000, only the slowest few rotary pairs stay nearly constant over the
    ~150-300 tokens between a question and the image, so content lookups ("the red circle") have few dimensions
    to match on; a larger base leaves more of them position-free.
    """
    text_config = model.config.get_text_config()
    text_config.rope_parameters = {**(text_config.rope_parameters or {}), "rope_theta": float(rope_theta)}
    language_model = model.model.language_model
    rotary = language_model.rotary_emb
    language_model.rotary_emb = type(rotary)(config=text_config).to(rotary.inv_freq.device)


def encode(processor: LlavaProcessor, examples: list[Example], images: list | None = None) -> dict:
    """Left-padded generation inputs for a batch of examples (images rendered unless given)."""
    images = images if images is not None else [example.image() for example in examples]
    prompts = [build_prompt(example.question) for example in examples]
    processor.tokenizer.padding_side = "left"
    return dict(processor(images=images, text=prompts, return_tensors="pt", padding=True))


@torch.no_grad()
def predict(
    model: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    examples: list[Example],
    batch_size: int = 32,
    max_new_tokens: int = 2,
    progress: bool = False,
) -> list[str]:
    """Greedy answers, decoded without special tokens."""
    from tqdm.auto import tqdm

    answers = []
    for start in tqdm(range(0, len(examples), batch_size), disable=not progress, desc="predict"):
        inputs = encode(processor, examples[start : start + batch_size])
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        new = output[:, inputs["input_ids"].shape[1] :]
        answers += processor.tokenizer.batch_decode(new, skip_special_tokens=True)
    return [answer.strip() for answer in answers]


def directory_size_mb(directory: str | Path) -> float:
    return sum(path.stat().st_size for path in Path(directory).rglob("*") if path.is_file()) / 2**20


EMBEDDED_MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / "synthetic-llava"


def require_embedded_model() -> Path:
    """The shipped trained model's directory, or a clear error if the installation lacks it."""
    if not (EMBEDDED_MODEL_DIR / "config.json").exists():
        raise ValueError(
            f"the embedded synthetic model is missing from this installation ({EMBEDDED_MODEL_DIR}); reinstall "
            "pyramiddrop, or pass --model with a hub id or a local model directory, or train one with "
            "`pdrop train --out DIR`."
        )
    return EMBEDDED_MODEL_DIR
