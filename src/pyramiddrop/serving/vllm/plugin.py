"""What `register()` installs in every vLLM process: the LLaVA class that drops visual tokens when the model's
config carries `pyramid_drop`, and the engine-start and request checks (pyramiddrop.serving.vllm.checks)."""

from __future__ import annotations

import functools

# vLLM architecture name -> the class that serves it ("module:Class", imported lazily by vLLM's registry). The
# class behaves exactly as vLLM's own unless the config carries `pyramid_drop`.
MODELS = {
    "LlavaForConditionalGeneration": "pyramiddrop.serving.vllm.models:PyramidDropLlava",
    "LlavaNextForConditionalGeneration": "pyramiddrop.serving.vllm.models:PyramidDropLlavaNext",
    "Qwen2VLForConditionalGeneration": "pyramiddrop.serving.vllm.models:PyramidDropQwen2VL",
    "Qwen2_5_VLForConditionalGeneration": "pyramiddrop.serving.vllm.models:PyramidDropQwen2_5VL",
}


def install() -> None:
    from vllm import ModelRegistry
    from vllm.config import VllmConfig
    from vllm.v1.engine.input_processor import InputProcessor

    for architecture, model_class in MODELS.items():
        ModelRegistry.register_model(architecture, model_class)
    if not getattr(VllmConfig.try_verify_and_update_config, "_pyramid_drop", False):
        VllmConfig.try_verify_and_update_config = _with_checks(VllmConfig.try_verify_and_update_config)
    # Request checks, before a request reaches the engine: every request passes through process_inputs
    # (LLM.generate / chat and the OpenAI server alike); beam search, which vLLM runs as a loop of such requests,
    # through its two entry points (LLM.beam_search, the server's use_beam_search).
    from vllm.entrypoints.generate.beam_search.offline import BeamSearchOfflineMixin
    from vllm.entrypoints.generate.beam_search.online import BeamSearchOnlineMixin

    for owner, name, wrap in (
        (InputProcessor, "process_inputs", _checking_inputs),
        (BeamSearchOfflineMixin, "beam_search", _checking_offline_beam_search),
        (BeamSearchOnlineMixin, "beam_search", _checking_online_beam_search),
    ):
        if not getattr(getattr(owner, name), "_pyramid_drop", False):
            setattr(owner, name, wrap(getattr(owner, name)))


def _with_checks(verify):
    """vLLM's per-model config hook (run when the engine's config is built, in the process that builds it),
    followed by PyramidDrop's checks."""

    @functools.wraps(verify)
    def verify_then_check(vllm_config) -> None:
        verify(vllm_config)
        from pyramiddrop.serving.vllm.checks import check_engine

        check_engine(vllm_config)

    verify_then_check._pyramid_drop = True
    return verify_then_check


def _check(processor, params, prompt=None) -> None:
    """pyramiddrop.serving.vllm.checks.check_request. A rendered prompt's images are already in the frontend's
    multimodal cache, marked as sent to the engine; a refused request never reaches it, so they are dropped from
    that cache (as vLLM does after a cache miss), or the next request with the same image would be sent without its
    data (vLLM 0.32 answers it with an empty output, or a 500 in the server)."""
    from pyramiddrop.serving.vllm.checks import check_request

    try:
        check_request(processor.model_config, params)
    except Exception:
        cache = processor.renderer.mm_processor_cache
        hashes = prompt.get("mm_hashes") if isinstance(prompt, dict) and cache is not None else None
        for mm_hash in [h for items in (hashes or {}).values() for h in items if h is not None]:
            cache.invalidate(mm_hash)
        raise


def _checking_inputs(process_inputs):
    @functools.wraps(process_inputs)
    def check_then_process(processor, request_id, prompt, params, *args, **kwargs):
        _check(processor, params, prompt)
        return process_inputs(processor, request_id, prompt, params, *args, **kwargs)

    check_then_process._pyramid_drop = True
    return check_then_process


def _checking_offline_beam_search(beam_search):
    @functools.wraps(beam_search)
    def check_then_search(llm, prompts, params, *args, **kwargs):
        _check(llm.llm_engine.input_processor, params)  # before the prompts are rendered
        return beam_search(llm, prompts, params, *args, **kwargs)

    check_then_search._pyramid_drop = True
    return check_then_search


def _checking_online_beam_search(beam_search):
    @functools.wraps(beam_search)
    async def check_then_search(serving, prompt, request_id, params, *args, **kwargs):
        _check(serving.engine_client.input_processor, params, prompt)  # the prompt is rendered already
        async for output in beam_search(serving, prompt, request_id, params, *args, **kwargs):
            yield output

    check_then_search._pyramid_drop = True
    return check_then_search
