"""What the lmms-eval plugin and the VLMEvalKit wrapper share: drop settings given as strings, prompts through
the processor's chat template, batched generation, continuation scoring, and the drop statistics of a run.

Both harnesses hand a model a prompt, its images and generation settings and expect text (or a score) back; the
harness-specific files only translate their request objects into calls on `PyramidDropRunner`, so the two give
the same answers for the same settings, and the same answers as `pdrop eval`.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import LogitsProcessor, LogitsProcessorList

from pyramiddrop import apply_pyramid_drop, get_drop_record
from pyramiddrop.adapters import get_adapter
from pyramiddrop.flops import paper_flops, prefill_flops
from pyramiddrop.settings import (  # noqa: F401  (the harnesses' drop settings, defined with the core's)
    ALL_METHODS,
    NO_DROP,
    SCHEDULE_EXAMPLES,
    DropRequest,
    Setting,
    parse_float_list,
    parse_int_list,
)
from pyramiddrop.tools.inputs import chat_prompt, count_visual_tokens

logger = logging.getLogger("pyramiddrop.integrations")

# ------------------------------------------------------------------------------------------ prompts, images


def load_image(value: Any) -> Image.Image:
    """A PIL image or an image file path, as RGB; videos and audio are refused with a clear error."""
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, str | Path) and Path(value).suffix.lower() in {
        ".png",
        ".jpg",
        ".jpeg",
        ".bmp",
        ".webp",
        ".gif",
    }:
        return Image.open(value).convert("RGB")
    raise NotImplementedError(
        f"pyramiddrop's harness integrations take images (PIL or image files), got {type(value).__name__} "
        f"{str(value)[:80]!r}; video and audio inputs are not supported here (use the Python API for videos)."
    )


def harness_parts(processor: Any, num_images: int, text: str) -> list[dict]:
    """Images first, then the text, as LLaVA's evaluation prompts (`<image>\\n{question}`) put them.

    A context that already holds the processor's image token places the images itself and gets no extra ones.
    """
    image_token = getattr(processor, "image_token", None)
    if num_images and image_token and image_token in text:
        return [{"type": "text", "text": text}]
    return [{"type": "image"}] * num_images + [{"type": "text", "text": text}]


# ------------------------------------------------------------------------------------------ statistics


@dataclass
class DropStats:
    """Sums over requests (one prefill each) of what the drop did; `summary()` gives the averages per request."""

    requests: int = 0
    visual_tokens: float = 0.0
    visual_tokens_per_layer: float = 0.0
    flops_paper: float = 0.0
    flops_e2e: float = 0.0
    flops_paper_no_drop: float = 0.0
    flops_e2e_no_drop: float = 0.0

    def add(self, sample: dict) -> None:
        self.requests += 1
        for key in sample:
            setattr(self, key, getattr(self, key) + sample[key])

    def summary(self) -> dict:
        count = max(self.requests, 1)
        out = {"requests": self.requests}
        for key in (
            "visual_tokens",
            "visual_tokens_per_layer",
            "flops_paper",
            "flops_e2e",
            "flops_paper_no_drop",
            "flops_e2e_no_drop",
        ):
            out[key] = getattr(self, key) / count
        out["flops_paper_fraction"] = self.flops_paper / self.flops_paper_no_drop if self.flops_paper_no_drop else None
        out["flops_e2e_fraction"] = self.flops_e2e / self.flops_e2e_no_drop if self.flops_e2e_no_drop else None
        return out


# ------------------------------------------------------------------------------------------ the runner


class _ForceTokens(LogitsProcessor):
    """Teacher forcing inside `generate()`: each row's next token is its continuation's next token."""

    def __init__(self, targets: list[list[int]], prompt_length: int, filler: int) -> None:
        self.targets, self.prompt_length, self.filler = targets, prompt_length, filler

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        step = input_ids.shape[1] - self.prompt_length
        forced = [target[step] if step < len(target) else self.filler for target in self.targets]
        index = torch.tensor(forced, device=scores.device)[:, None]
        return torch.full_like(scores, float("-inf")).scatter_(1, index, 0.0)


class PyramidDropRunner:
    """A loaded model with its processor and drop settings, answering harness requests in batches.

    The drop is applied once (eagerly when the schedule does not depend on N, otherwise at the first image) and
    every prefill's record is turned into per-sample statistics, grouped by task, for the run's record.
    """

    def __init__(self, model: Any, processor: Any, request: DropRequest, name: str = "") -> None:
        self.model, self.processor, self.request, self.name = model, processor, request, name
        self.adapter = get_adapter(model)  # unsupported families fail here, with the list of supported ones
        text = model.config.get_text_config()
        self.shape = (text.num_hidden_layers, text.hidden_size, text.intermediate_size)
        self.setting: Setting | None = None
        self.stats: dict[str, DropStats] = {}
        self.last_samples: list[dict] = []  # per-sample statistics of the last call (for harness logs)
        self.last_generated_tokens: list[int] = []  # new tokens per sample of the last `generate` call
        if not request.needs_visual_tokens:
            self._apply(None)

    @classmethod
    def from_pretrained(
        cls,
        pretrained: str,
        request: DropRequest,
        device: str | None = None,
        dtype: str = "auto",
        attn_implementation: str | None = None,
        device_map: str | None = None,
        trust_remote_code: bool = False,
        revision: str | None = None,
    ) -> PyramidDropRunner:
        """Any supported family through `AutoModelForImageTextToText` and `AutoProcessor` (hub id or directory)."""
        from transformers import AutoModelForImageTextToText, AutoProcessor

        if dtype not in ("auto", "float32", "float16", "bfloat16"):
            raise ValueError(f"dtype={dtype!r} is not one of auto, float32, float16, bfloat16.")
        options = {"trust_remote_code": bool(trust_remote_code)}
        if revision:
            options["revision"] = revision
        processor = AutoProcessor.from_pretrained(pretrained, **options)
        model = AutoModelForImageTextToText.from_pretrained(
            pretrained,
            dtype=dtype if dtype == "auto" else getattr(torch, dtype),
            attn_implementation=attn_implementation,
            device_map=device_map or None,
            **options,
        ).eval()
        if not device_map:
            model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        return cls(model, processor, request, name=pretrained)

    # -- drop settings ---------------------------------------------------------------------------------------
    def _apply(self, num_visual_tokens: int | None) -> None:
        self.setting = self.request.resolve(self.shape[0], num_visual_tokens, self.adapter.position_modes)
        if self.setting.config is not None:
            apply_pyramid_drop(self.model, self.setting.config)
        logger.info("pyramiddrop: %s %s", self.setting.method, json.dumps(self.setting.settings))

    def _ensure_applied(self, inputs: dict) -> None:
        if self.setting is not None:
            return
        counts = count_visual_tokens(self.model, inputs["input_ids"]).cpu()
        present = counts[counts > 0]
        if len(present):  # a budget's schedule needs N: the first sample with an image decides, as `pdrop eval`
            self._apply(int(present[0]))

    # -- inputs ----------------------------------------------------------------------------------------------
    def encode(self, images: list[list[Image.Image]], prompts: list[str]) -> dict:
        """Left-padded batch (what `generate()` expects), on the model's device, floats in the model's dtype."""
        flat = [image for sample in images for image in sample]
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        tokenizer.padding_side = "left"
        batch = self.processor(images=flat or None, text=prompts, return_tensors="pt", padding=True)
        device, dtype = self.model.device, self.model.dtype
        return {
            key: (value.to(device, dtype) if value.is_floating_point() else value.to(device))
            if torch.is_tensor(value)
            else value
            for key, value in batch.items()
        }

    def prompts(self, images: list[list[Image.Image]], texts: list[str]) -> list[str]:
        return [chat_prompt(self.processor, harness_parts(self.processor, len(i), t)) for i, t in zip(images, texts)]

    # -- requests --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        images: list[list[Image.Image]],
        prompts: list[str],
        max_new_tokens: int = 128,
        until: list[str] | None = None,
        tasks: list[str] | None = None,
        **generation: Any,
    ) -> list[str]:
        """Greedy (or sampled, if asked) answers to full prompts, cut at the first stop string of `until`."""
        inputs = self.encode(images, prompts)
        self._ensure_applied(inputs)
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        output = self.model.generate(**inputs, max_new_tokens=max_new_tokens, pad_token_id=pad, **generation)
        self._observe(inputs, tasks)
        new = output[:, inputs["input_ids"].shape[1] :]
        self.last_generated_tokens = (new != pad).sum(1).tolist()
        texts = self.processor.batch_decode(new, skip_special_tokens=True)
        return [_cut(text, until) for text in texts]

    @torch.no_grad()
    def loglikelihood(
        self,
        images: list[list[Image.Image]],
        prompts: list[str],
        continuations: list[str],
        tasks: list[str] | None = None,
    ) -> list[tuple[float, bool]]:
        """(mean negative log-likelihood of the continuation's tokens, whether greedy decoding produces them).

        The continuation is scored the way the model would generate it: the prompt is prefilled (so the drop ranks
        visual tokens with the prompt's last token, exactly as in `generate_until`) and the continuation is fed
        token by token through the cache. A single forward over prompt + continuation would instead let the
        continuation's last token choose the kept tokens, and after a drop its logits are shorter than the input.
        The value is the mean NLL, lmms-eval's convention (its models return the loss; `multiple_choice` takes the
        argmin), so the harness's tasks score it as they score its own HF models.
        """
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        targets = [continuation_ids(tokenizer, p, c) for p, c in zip(prompts, continuations)]
        inputs = self.encode(images, prompts)
        self._ensure_applied(inputs)
        length = max(len(t) for t in targets)
        config = copy.deepcopy(self.model.generation_config)
        config.eos_token_id = None  # run every forced step, even past an end-of-sequence token
        config.max_new_tokens, config.min_new_tokens, config.do_sample, config.num_beams = length, None, False, 1
        config.temperature = config.top_p = config.top_k = None
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        config.pad_token_id, config.output_logits, config.return_dict_in_generate = pad, True, True
        force = _ForceTokens(targets, inputs["input_ids"].shape[1], pad)
        output = self.model.generate(**inputs, generation_config=config, logits_processor=LogitsProcessorList([force]))
        self._observe(inputs, tasks)
        logits = torch.stack(output.logits, dim=1).float()  # [batch, steps, vocab], raw (before the forcing)
        log_probs = logits.log_softmax(-1)
        results = []
        for row, target in enumerate(targets):
            index = torch.tensor(target, device=logits.device)
            steps = log_probs[row, : len(target)]
            nll = -steps.gather(1, index[:, None]).mean()
            greedy = bool((logits[row, : len(target)].argmax(-1) == index).all())
            results.append((float(nll), greedy))
        return results

    # -- statistics ------------------------------------------------------------------------------------------
    def _observe(self, inputs: dict, tasks: list[str] | None) -> None:
        """Per-sample visual tokens, visual tokens per layer and FLOPs, as `pyramiddrop.tools.evaluate` counts them."""
        config = self.setting.config if self.setting is not None else None
        self.last_samples = []
        record = get_drop_record(self.model) if config is not None else None
        num_visual = count_visual_tokens(self.model, inputs["input_ids"]).cpu()
        stride = record.visual_tokens_per_layer.shape[0] // len(num_visual) if record else 1  # beams expand rows
        num_text = inputs["attention_mask"].sum(1).cpu() - num_visual
        for row in range(len(num_visual)):
            n_visual, n_text = int(num_visual[row]), int(num_text[row])
            per_layer = float(record.visual_tokens_per_layer[row * stride].float().mean()) if record else n_visual
            sample = {
                "visual_tokens": n_visual,
                "visual_tokens_per_layer": per_layer,
                "flops_paper": paper_flops(*self.shape, n_visual, config),
                "flops_e2e": prefill_flops(self.model.config, n_text, n_visual, config),
                "flops_paper_no_drop": paper_flops(*self.shape, n_visual),
                "flops_e2e_no_drop": prefill_flops(self.model.config, n_text, n_visual),
            }
            self.last_samples.append(sample)
            task = tasks[row] if tasks else "all"
            self.stats.setdefault(task, DropStats()).add(sample)
            self.stats.setdefault("__all__", DropStats()).add(sample)

    def summary(self) -> dict:
        """The run's record: model, drop settings, and per task and overall the averages per request."""
        setting = self.setting
        return {
            "model": self.name,
            "method": setting.method if setting else self.request.method,
            "settings": setting.settings if setting else self.request.describe(),
            "schedule_resolved": setting is not None,
            "num_layers": self.shape[0],
            "overall": self.stats.get("__all__", DropStats()).summary(),
            "tasks": {task: stats.summary() for task, stats in self.stats.items() if task != "__all__"},
        }

    def write_record(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.summary(), indent=2))


def continuation_ids(tokenizer: Any, prompt: str, continuation: str) -> list[int]:
    """Token ids of `continuation` after `prompt`, as they are tokenized together (the longest common prefix of
    the two tokenizations is the prompt); a tokenizer that merges across the boundary falls back to the
    continuation tokenized alone."""
    whole = tokenizer(prompt + continuation, add_special_tokens=True)["input_ids"]
    alone = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    common = 0
    while common < min(len(whole), len(alone)) and whole[common] == alone[common]:
        common += 1
    ids = whole[common:] if common == len(alone) else tokenizer(continuation, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"the continuation {continuation!r} has no tokens after the prompt; nothing to score.")
    return list(ids)


def _cut(text: str, until: list[str] | None) -> str:
    for stop in until or []:
        if stop and stop in text:
            text = text.split(stop, 1)[0]
    return text.strip()
