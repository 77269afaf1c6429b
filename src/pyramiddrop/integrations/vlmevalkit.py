"""`PyramidDropVLM`: any model PyramidDrop supports, with or without dropping, as a VLMEvalKit model.

VLMEvalKit is not on PyPI in a form this project installs, and it lists its models in `vlmeval/config.py`;
`register()` adds ours to that list at run time, so no VLMEvalKit file needs editing:

    # run_pdrop.py, next to VLMEvalKit's run.py
    import runpy
    from pyramiddrop.integrations.vlmevalkit import register

    register("llava-1.5-7b-pdrop", model_path="llava-hf/llava-1.5-7b-hf", layer_list=[8, 16, 24],
             ratios=[0.5, 0.25, 0.125], record="outputs/llava-1.5-7b-pdrop.pdrop.json")
    runpy.run_path("run.py", run_name="__main__")

    python run_pdrop.py --data MME POPE --model llava-1.5-7b-pdrop

VLMEvalKit calls `generate(message, dataset)` once per sample with `message` a list of
`{"type": "image" | "text", "value": path or text}`; the base class checks the message and calls
`generate_inner`, which runs the prompt through the processor's chat template (images and text in the message's
order) and greedy `generate()`. Without VLMEvalKit installed, a minimal stand-in base class with the same
contract keeps this module importable and testable.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from pyramiddrop.integrations.common import DropRequest, PyramidDropRunner, chat_prompt, load_image

try:  # the documented interface: vlmeval/vlm/base.py
    from vlmeval.vlm.base import BaseModel
except ImportError:  # VLMEvalKit is the user's install; the stand-in keeps `generate_inner` usable and testable

    class BaseModel:  # type: ignore[no-redef]
        """The part of VLMEvalKit's `BaseModel` contract this wrapper relies on."""

        INTERLEAVE = False
        allowed_types = ["text", "image"]

        def use_custom_prompt(self, dataset: str | None) -> bool:
            return False

        def generate(self, message: Any, dataset: str | None = None) -> str:
            if isinstance(message, str):
                message = [{"type": "text", "value": message}]
            for item in message:
                if item.get("type") not in self.allowed_types:
                    raise ValueError(f"Invalid input type: {item.get('type')}")
            return self.generate_inner(message, dataset)


VLMEVALKIT_AVAILABLE = BaseModel.__module__.startswith("vlmeval")


class PyramidDropVLM(BaseModel):
    """VLMEvalKit model over `PyramidDropRunner`: the same settings and answers as `pdrop_hf` in lmms-eval.

    Args:
        model_path: hub id or local directory of any supported family (loaded with the Auto classes).
        layer_list, ratios / lam, stages / budget, method, position_mode, query, seed, video_pool,
            num_visual_tokens: the drop settings, as lists or `8-16-24` strings (see `DropRequest`); none of
            them means the unmodified model.
        max_new_tokens: answer length limit (VLMEvalKit's benchmarks are short-answer; default 512 as its HF models).
        record: a JSON file rewritten after every sample with the settings, visual tokens per layer and FLOPs.
        device, dtype, attn_implementation, device_map, trust_remote_code, revision: model loading.
    """

    INTERLEAVE = True  # images may sit anywhere in the message; the chat template keeps their order

    def __init__(
        self,
        model_path: str,
        layer_list: Any = None,
        ratios: Any = None,
        lam: Any = None,
        stages: Any = None,
        budget: Any = None,
        method: str | None = None,
        position_mode: str | None = None,
        query: str | None = None,
        seed: Any = None,
        video_pool: str | None = None,
        num_visual_tokens: Any = None,
        max_new_tokens: int = 512,
        record: str | None = None,
        device: str | None = None,
        dtype: str = "auto",
        attn_implementation: str | None = None,
        device_map: str | None = None,
        trust_remote_code: bool = False,
        revision: str | None = None,
        runner: PyramidDropRunner | None = None,
    ) -> None:
        super().__init__()
        request = DropRequest.from_args(
            method=method,
            layer_list=layer_list,
            ratios=ratios,
            lam=lam,
            stages=stages,
            budget=budget,
            position_mode=position_mode,
            query=query,
            seed=seed,
            video_pool=video_pool,
            num_visual_tokens=num_visual_tokens,
        )
        self.runner = runner or PyramidDropRunner.from_pretrained(
            model_path,
            request,
            device=device,
            dtype=dtype,
            attn_implementation=attn_implementation,
            device_map=device_map,
            trust_remote_code=trust_remote_code,
            revision=revision,
        )
        self.max_new_tokens = int(max_new_tokens)
        self.record = record

    def generate_inner(self, message: list[dict], dataset: str | None = None) -> str:
        """One greedy answer to one message (`[{"type": "image", "value": path}, {"type": "text", ...}]`)."""
        images, prompt = self.message_to_inputs(message)
        answer = self.runner.generate(
            [images], [prompt], max_new_tokens=self.max_new_tokens, tasks=[dataset or "all"], do_sample=False
        )[0]
        if self.record:
            self.runner.write_record(self.record)
        return answer

    def message_to_inputs(self, message: list[dict]) -> tuple[list, str]:
        """The message's images and its prompt: one user turn through the chat template, in the message's order
        (adjacent text items joined by a newline; VLMEvalKit splits hints, questions and options)."""
        parts, images = [], []
        for item in message:
            if item["type"] == "image":
                images.append(load_image(item["value"]))
                parts.append({"type": "image"})
            elif item["type"] == "text":
                if parts and parts[-1]["type"] == "text":
                    parts[-1] = {"type": "text", "text": parts[-1]["text"] + "\n" + item["value"]}
                else:
                    parts.append({"type": "text", "text": item["value"]})
            else:
                raise NotImplementedError(f"PyramidDropVLM takes text and images, got a {item['type']!r} item.")
        return images, chat_prompt(self.runner.processor, parts)

    def summary(self) -> dict:
        """Drop settings, visual tokens per layer and FLOPs so far, per dataset (see `PyramidDropRunner.summary`)."""
        return self.runner.summary()


def register(name: str, **kwargs: Any) -> None:
    """Make `name` a VLMEvalKit model (`--model name`) built as `PyramidDropVLM(**kwargs)`.

    Adds it to `vlmeval.config.supported_VLM` (what `run.py --model` looks up) and exposes the class as
    `vlmeval.vlm.PyramidDropVLM` (what a `--config` JSON's `"class"` looks up).
    """
    if not VLMEVALKIT_AVAILABLE:
        raise ImportError("register() needs VLMEvalKit (`pip install -e .` in its checkout); see docs/evaluation.md.")
    import vlmeval.vlm
    from vlmeval.config import supported_VLM

    supported_VLM[name] = partial(PyramidDropVLM, **kwargs)
    vlmeval.vlm.PyramidDropVLM = PyramidDropVLM
