"""Starting and stopping vLLM engines in the tests."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path


@contextmanager
def engine(model_dir: Path, config=None, **options):
    """An offline vLLM engine on the tiny model (float32, eager); `config`: a PyramidDropConfig passed as
    hf_overrides (None: whatever the model's config.json says). Shut down on exit."""
    from vllm import LLM

    overrides = {"pyramid_drop": config.to_dict()} if config is not None else {}
    settings = dict(dtype="float32", max_model_len=512, enforce_eager=True, seed=0, limit_mm_per_prompt={"image": 2})
    llm = LLM(model=str(model_dir), hf_overrides=overrides, **(settings | options))
    try:
        yield llm
    finally:
        llm.llm_engine.engine_core.shutdown()


def greedy(max_tokens: int):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def tokens(outputs) -> list[list[int]]:
    return [list(output.outputs[0].token_ids) for output in outputs]
