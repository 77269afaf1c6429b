"""Prompts, images and the transformers engine's greedy tokens, the reference that vLLM must reproduce."""

from __future__ import annotations

from pathlib import Path

import torch
from tiny_processors import images

# (prompt, number of images): different prompt lengths, one image before the question or inside it, two images.
PROMPTS = [
    ("user: <image> w5 w6 w7 assistant:", 1),
    ("user: <image> w8 w9 w10 w11 w12 w13 w14 w15 w16 w17 w18 assistant:", 1),
    ("user: w20 w21 <image> w30 assistant:", 1),
    ("user: <image> w40 <image> w41 w42 assistant:", 2),
    ("user: w50 w51 w52 w53 <image> w54 w55 w56 w57 w58 w59 w60 w61 assistant:", 1),
    ("user: <image> assistant:", 1),
]


def requests(prompts=PROMPTS, seed: int = 0) -> list[dict]:
    """vLLM prompt dicts with PIL images of different sizes (the processor resizes them to 56 px)."""
    out = []
    for index, (prompt, count) in enumerate(prompts):
        pictures = images([(56 + 8 * index, 48 + 4 * count)] * count, seed=seed + index)
        out.append({"prompt": prompt, "multi_modal_data": {"image": pictures if count > 1 else pictures[0]}})
    return out


def transformers_tokens(model_dir: Path, config, prompts: list[dict], max_new_tokens: int) -> list[list[int]]:
    """Greedy tokens of our transformers engine (`apply_pyramid_drop` + `generate`), one request at a time;
    `config=None`: the model without PyramidDrop."""
    return [tokens for tokens, _ in transformers_greedy(model_dir, config, prompts, max_new_tokens)]


def transformers_greedy(
    model_dir: Path, config, prompts: list[dict], max_new_tokens: int
) -> list[tuple[list[int], list[float]]]:
    """Per request: the transformers engine's greedy tokens and each one's logprob (log-softmax of the raw logits,
    what vLLM's `logprobs` report by default)."""
    processor, model = transformers_model(model_dir, config)
    out = []
    for request in prompts:
        batch = processor_inputs(processor, request)
        generated = model.generate(
            **batch, max_new_tokens=max_new_tokens, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
        tokens = generated.sequences[0, batch["input_ids"].shape[1] :]
        logprobs = [torch.log_softmax(step[0], -1)[token].item() for step, token in zip(generated.logits, tokens)]
        out.append((tokens.tolist(), logprobs))
    return out


def transformers_model(model_dir: Path, config):
    """The processor and the float32 model, with PyramidDrop applied when `config` is given."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from pyramiddrop import apply_pyramid_drop

    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    if config is not None:
        apply_pyramid_drop(model, config)
    return processor, model


def processor_inputs(processor, request: dict) -> dict:
    """The processor's tensors for one vLLM prompt dict."""
    image = request["multi_modal_data"]["image"]
    return processor(text=request["prompt"], images=image if isinstance(image, list) else [image], return_tensors="pt")
