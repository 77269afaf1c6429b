"""Which requests a step holds, and what PyramidDrop remembers about each between steps.

The model's forward sees only flat tokens; the runner knows the requests. A wrapper around the runner's
`_model_forward` (the method vLLM documents as the place to override model execution) hands the model each
step's request ids and prompt lengths in batch order, the order of the attention metadata's rows. The drop state
is keyed by request id, so it survives the runner reordering its batch and requests joining or leaving; a
preempted request is recomputed from scratch by vLLM, a new prefill that ranks again with the same prompt.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field


@dataclass
class StepRequests:
    """The step's requests in batch order: ids and prompt lengths."""

    ids: list[str]
    prompt_lengths: list[int]


@dataclass
class RequestDrops:
    """Per request: visual tokens removed before each stage (stage 0: 0), fixed by its prefill."""

    removed: list[int] = field(default_factory=list)


def patch_model_runner() -> None:
    """Wrap GPUModelRunner._model_forward (CPUModelRunner inherits it) once per process."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if getattr(GPUModelRunner._model_forward, "_pyramid_drop", False):
        return
    GPUModelRunner._model_forward = _announcing_requests(GPUModelRunner._model_forward)


def _announcing_requests(model_forward):
    @functools.wraps(model_forward)
    def announce_then_forward(runner, *args, **kwargs):
        runtime = getattr(runner.model, "pyramid_drop_runtime", None)
        if runtime is not None:
            batch = runner.input_batch
            count = batch.num_reqs
            scoring = [request_id for request_id in batch.req_ids[:count] if request_id in runner.num_prompt_logprobs]
            if scoring:  # refused at request validation (checks.check_request); this is the second line
                raise RuntimeError(
                    f"PyramidDrop: requests {scoring} ask for prompt_logprobs, which are wrong at dropped positions; "
                    "remove prompt_logprobs or serve the model without `pyramid_drop`."
                )
            runtime.begin_step(
                StepRequests(list(batch.req_ids[:count]), batch.num_prompt_tokens[:count].tolist()),
                live=runner.requests.keys(),
            )
        return model_forward(runner, *args, **kwargs)

    announce_then_forward._pyramid_drop = True
    return announce_then_forward
