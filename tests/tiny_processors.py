"""Small word-level tokenizers with a family's special tokens and chat template, for the families' own processor
classes (their PIL image processors need no torchvision). Special tokens get ids from 100 up, text words 4..99."""

from __future__ import annotations

from tiny_models import PAD_ID, VOCAB

WORDS = (":", "\n", "user", "assistant")


def chat_template(image: str) -> str:
    """`user: <image> text ... assistant:`, with the family's image placeholder string."""
    return (
        "{% for m in messages %}{{ m['role'] }}:{% for c in m['content'] %}{% if c['type'] == 'image' %} "
        + image
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
