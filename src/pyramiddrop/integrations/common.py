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
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import LogitsProcessor, LogitsProcessorList

from pyramiddrop import PyramidDropConfig, apply_pyramid_drop, get_drop_record
from pyramiddrop.adapters import get_adapter
from pyramiddrop.budget import METHODS, schedule_for
from pyramiddrop.evaluate import Setting
from pyramiddrop.flops import paper_flops, prefill_flops

logger = logging.getLogger("pyramiddrop.integrations")

NO_DROP = ("none", "nodrop", "no-drop", "no_drop", "baseline")
ALL_METHODS = ("none", "fastv", *METHODS)
SCHEDULE_EXAMPLES = (
    "layer_list=8-16-24,ratios=0.5-0.25-0.125 (drop after these 1-based layers, keep these fractions), "
    "lam=0.5,stages=4 (the paper's equal stages) or budget=0.33 (average visual tokens per layer over N)"
)


# ------------------------------------------------------------------------------------------- drop settings


def parse_int_list(value: Any, name: str) -> list[int]:
    """`8-16-24`, `8 16 24`, `[8,16,24]`, `8` or a Python list: harness argument strings cannot hold commas."""
    items = _split_list(value)
    try:
        numbers = [float(item) for item in items]
    except ValueError:
        numbers = []
    if not numbers or any(number != int(number) for number in numbers):
        raise ValueError(
            f"{name}={value!r} is not a list of integers; separate them with '-', e.g. {name}=8-16-24 "
            "(commas split harness model_args)."
        )
    return [int(number) for number in numbers]


def parse_float_list(value: Any, name: str) -> list[float]:
    """`0.5-0.25-0.125`, `0.5 0.25`, `[0.5,0.25]`, `0.5` or a Python list."""
    items = _split_list(value)
    try:
        numbers = [float(item) for item in items]
    except ValueError:
        numbers = []
    if not numbers:
        raise ValueError(
            f"{name}={value!r} is not a list of numbers; separate them with '-', e.g. {name}=0.5-0.25-0.125 "
            "(commas split harness model_args)."
        )
    return numbers


def _split_list(value: Any) -> list[str]:
    if isinstance(value, list | tuple):
        return [str(item) for item in value]
    if isinstance(value, int | float) and not isinstance(value, bool):
        return [str(value)]
    text = str(value).strip().strip("[]()")
    return [item for item in re.split(r"[-\s,;/|]+", text) if item]


@dataclass
class DropRequest:
    """The drop settings as a harness gives them, checked for consistency before any model is loaded.

    Exactly one schedule (`layer_list` + `ratios`, `lam` [+ `stages`], or `budget`) or none (no drop). `method`
    picks the ranking (`pdrop`, `random`, `uniform`, `dart`, `pdrop-mean`, `pdrop-original`) or FastV's single
    drop (`fastv`); `none` is the unmodified model. The schedule of a budget depends on the visual-token count
    N, so it is resolved from `num_visual_tokens` or, if not given, from the first image the model sees.
    """

    method: str = "none"
    layer_list: list[int] | None = None
    ratios: list[float] | None = None
    lam: float | None = None
    stages: int | None = None
    budget: float | None = None
    overrides: dict = field(default_factory=dict)  # position_mode, query, seed, video_pool given explicitly
    num_visual_tokens: int | None = None

    @classmethod
    def from_args(
        cls,
        method: str | None = None,
        layer_list: Any = None,
        ratios: Any = None,
        lam: Any = None,
        stages: Any = None,
        budget: Any = None,
        position_mode: str | None = None,
        query: str | None = None,
        seed: Any = None,
        video_pool: str | None = None,
        num_visual_tokens: Any = None,
    ) -> DropRequest:
        """Parse and cross-check; every error says which argument to change and how."""
        explicit = method is not None and str(method).strip() != ""
        name = str(method).strip().lower() if explicit else "none"
        name = "none" if name in NO_DROP else name
        if name not in ALL_METHODS:
            raise ValueError(f"method={method!r} is unknown; use one of {', '.join(ALL_METHODS)}.")
        schedules = [
            label
            for label, given in (
                ("layer_list/ratios", layer_list is not None or ratios is not None),
                ("lam", lam is not None),
                ("budget", budget is not None),
            )
            if given
        ]
        if len(schedules) > 1:
            raise ValueError(f"give one schedule, not {' and '.join(schedules)}: {SCHEDULE_EXAMPLES}.")
        if stages is not None and lam is None:
            raise ValueError("stages only applies with lam (e.g. lam=0.5,stages=4); remove stages or add lam.")
        if (layer_list is None) != (ratios is None):
            raise ValueError(
                "layer_list and ratios go together, one keep ratio per drop layer, e.g. "
                "layer_list=8-16-24,ratios=0.5-0.25-0.125."
            )
        if explicit and name == "none" and schedules:
            raise ValueError(
                f"method={method} means no drop but a schedule ({schedules[0]}) was given; remove method to use "
                "PyramidDrop (method=pdrop is the default with a schedule) or remove the schedule."
            )
        if name == "fastv" and lam is not None:
            raise ValueError(
                "method=fastv is one drop: give budget=0.33, or layer_list=K,ratios=R (e.g. layer_list=2,ratios=0.5)."
            )
        if not schedules and name != "none":
            raise ValueError(
                f"method={method} needs a schedule: add {SCHEDULE_EXAMPLES}; leave method out (or method=none) "
                "to run the model without dropping."
            )
        if schedules and not explicit:
            name = "pdrop"
        request = cls(method=name, num_visual_tokens=_optional_int(num_visual_tokens, "num_visual_tokens"))
        if layer_list is not None:
            request.layer_list = parse_int_list(layer_list, "layer_list")
            request.ratios = parse_float_list(ratios, "ratios")
            if name == "fastv" and len(request.layer_list) != 1:
                raise ValueError(
                    f"method=fastv drops once; give one layer and one ratio (e.g. layer_list=2,ratios=0.5), got "
                    f"layer_list={request.layer_list}."
                )
        if lam is not None:
            request.lam = _number(lam, "lam")
            request.stages = 4 if stages is None else _optional_int(stages, "stages")
        if budget is not None:
            request.budget = _number(budget, "budget")
        given = {"position_mode": position_mode, "query": query, "video_pool": video_pool}
        request.overrides = {key: str(value) for key, value in given.items() if value is not None}
        if seed is not None:
            request.overrides["seed"] = _optional_int(seed, "seed")
        fixed = _method_fields(name)
        for key, value in request.overrides.items():
            if key in fixed and fixed[key] != value:
                raise ValueError(
                    f"method={name} sets {key}={fixed[key]!r}; remove {key}={value} or choose another method."
                )
        if request.overrides and name == "none":
            raise ValueError(
                f"{', '.join(request.overrides)} only apply when dropping; add a schedule ({SCHEDULE_EXAMPLES})."
            )
        request._check_values()
        return request

    def _check_values(self) -> None:
        """Range checks that need no model (depth and N are checked when the model is known)."""
        if not self.drops:
            return
        fields = {**_method_fields(self.method), **self.overrides}
        if self.layer_list is not None:
            PyramidDropConfig(self.layer_list, self.ratios, **fields)
            return
        PyramidDropConfig(**fields)  # position_mode, query, video_pool, seed
        if self.lam is not None:
            if not 0.0 < self.lam < 1.0:
                raise ValueError(f"lam must be in (0, 1), e.g. lam=0.5, got {self.lam}.")
            if self.stages < 2:
                raise ValueError(f"stages must be at least 2 (stage 0 keeps every token), got {self.stages}.")
        if self.budget is not None and not 0.0 < self.budget < 1.0:
            raise ValueError(
                f"budget must be in (0, 1) (average visual tokens per layer over N, e.g. 0.33 for 192 of 576), "
                f"got {self.budget}."
            )

    def describe(self) -> dict:
        """The settings as given (before the model resolves them into a schedule)."""
        given = {"layer_list": self.layer_list, "ratios": self.ratios, "lam": self.lam, "stages": self.stages}
        given |= {"budget": self.budget, "num_visual_tokens": self.num_visual_tokens}
        return {key: value for key, value in given.items() if value is not None} | self.overrides

    @property
    def drops(self) -> bool:
        return self.method != "none"

    @property
    def needs_visual_tokens(self) -> bool:
        """Whether the schedule depends on the visual-token count N (only budgets do)."""
        return self.budget is not None and self.num_visual_tokens is None

    def resolve(
        self, num_layers: int, num_visual_tokens: int | None = None, position_modes: tuple[str, ...] | None = None
    ) -> Setting:
        """The engine config for a model with `num_layers` decoder layers, as a `pdrop eval` row's `Setting`.

        `position_modes` (the family's valid modes): when the user gave no `position_mode` and the method's default
        is invalid for the family (Qwen-VL takes only `original`), the valid one is used and logged.
        """
        if not self.drops:
            return Setting("none", None)
        if self.budget is not None:
            n = self.num_visual_tokens or num_visual_tokens
            config = schedule_for(self.method, self.budget, num_layers, int(n))
            extra = {"budget": self.budget}
        elif self.lam is not None:
            config = replace(PyramidDropConfig.from_lambda(num_layers, self.stages, self.lam), **METHODS[self.method])
            extra = {"lam": self.lam, "stages": self.stages}
        else:
            config = PyramidDropConfig(self.layer_list, self.ratios, **_method_fields(self.method))
            extra = {}
        config = replace(config, **self.overrides)
        if position_modes and "position_mode" not in self.overrides and config.position_mode not in position_modes:
            logger.warning(
                "pyramiddrop: position_mode=%r is not valid for this model family; using %r (pass position_mode= to "
                "choose).",
                config.position_mode,
                position_modes[0],
            )
            config = replace(config, position_mode=position_modes[0])
        config.validate_for(num_layers)
        return Setting(self.method, config, extra)


def _method_fields(method: str) -> dict:
    if method == "fastv":
        return {"position_mode": "original"}
    return dict(METHODS.get(method, {}))


def _number(value: Any, name: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r} is not a number (e.g. {name}=0.5).") from None


def _optional_int(value: Any, name: str) -> int | None:
    if value is None:
        return None
    number = _number(value, name)
    if number != int(number):
        raise ValueError(f"{name}={value!r} must be an integer.")
    return int(number)


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


def chat_prompt(processor: Any, parts: list[dict]) -> str:
    """One user turn of `parts` (`{"type": "image"}` / `{"type": "text", "text": ...}`, in order), with the
    generation prompt. The same template `pdrop eval` uses (`cli.build_inputs`), so answers match it exactly.
    """
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": parts}]
        return processor.apply_chat_template(messages, add_generation_prompt=True)
    image_token = getattr(processor, "image_token", None) or "<image>"
    body = "".join(f"{image_token}\n" if part["type"] == "image" else part["text"] for part in parts)
    return f"USER: {body} ASSISTANT:"


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
        ids = [getattr(model.config, key, None) for key in self.adapter.visual_token_keys]
        self.visual_token_ids = [i for i in ids if i is not None]
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
        counts = self._visual_counts(inputs)
        present = counts[counts > 0]
        if len(present):  # a budget's schedule needs N: the first sample with an image decides, as `pdrop eval`
            self._apply(int(present[0]))

    def _visual_counts(self, inputs: dict) -> torch.Tensor:
        ids = inputs["input_ids"]
        visual = torch.zeros_like(ids, dtype=torch.bool)
        for token_id in self.visual_token_ids:
            visual |= ids == token_id
        return visual.sum(1).cpu()

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
        """Per-sample visual tokens, visual tokens per layer and FLOPs, as `pyramiddrop.evaluate` counts them."""
        config = self.setting.config if self.setting is not None else None
        self.last_samples = []
        record = get_drop_record(self.model) if config is not None else None
        num_visual = self._visual_counts(inputs)
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
