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


def preempted(model_dir: Path, config, prompts: list[dict], max_tokens: int, blocks: int, max_model_len: int):
    """Greedy tokens from an engine with `blocks` KV blocks of 32 tokens, too few for the prompts together, so vLLM
    preempts requests and recomputes them; asserts that it did."""
    options = dict(block_size=32, num_gpu_blocks_override=blocks, max_model_len=max_model_len, disable_log_stats=False)
    with engine(model_dir, config, **options) as llm:
        got = tokens(llm.generate(prompts, greedy(max_tokens)))
        preemptions = sum(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions")
    assert preemptions > 0, "no request was preempted; lower the number of blocks"
    return got


def joining_while_decoding(llm, prompts: list[dict], first: int, steps: int, max_tokens: int) -> list[list[int]]:
    """Greedy tokens when prompts[:first] are submitted, the engine steps `steps` times (none may finish: they are
    decoding when the others arrive), and then the rest join."""
    core, finished = llm.llm_engine, {}

    def step() -> None:
        finished.update({out.request_id: list(out.outputs[0].token_ids) for out in core.step() if out.finished})

    for index in range(first):
        core.add_request(str(index), prompts[index], greedy(max_tokens))
    for _ in range(steps):
        step()
    assert not finished, "the first requests finished before the others joined; make them longer"
    for index in range(first, len(prompts)):
        core.add_request(str(index), prompts[index], greedy(max_tokens))
    while core.has_unfinished_requests():
        step()
    return [finished[str(index)] for index in range(len(prompts))]
