"""What `register()` installs in every vLLM process: the LLaVA class that drops visual tokens when the model's
config carries `pyramid_drop`, and the engine-start and request checks (pyramiddrop.serving.vllm.checks)."""

from __future__ import annotations

import functools

# vLLM architecture name -> the class that serves it ("module:Class", imported lazily by vLLM's registry). The
# class behaves exactly as vLLM's own unless the config carries `pyramid_drop`.
MODELS = {
    "LlavaForConditionalGeneration": "pyramiddrop.serving.vllm.llava:PyramidDropLlava",
    "LlavaNextForConditionalGeneration": "pyramiddrop.serving.vllm.llava:PyramidDropLlavaNext",
}


def install() -> None:
    from vllm import ModelRegistry
    from vllm.config import VllmConfig
    from vllm.v1.engine.input_processor import InputProcessor

    for architecture, model_class in MODELS.items():
        ModelRegistry.register_model(architecture, model_class)
    if not getattr(VllmConfig.try_verify_and_update_config, "_pyramid_drop", False):
        VllmConfig.try_verify_and_update_config = _with_checks(VllmConfig.try_verify_and_update_config)
    # Request checks: every request passes through process_inputs (LLM.generate / chat and the OpenAI server
    # alike) before it reaches the engine, and both beam-search entry points (LLM.beam_search, the server's
    # use_beam_search) pass their BeamSearchParams to resolve_watermarking before anything else.
    for name, wrap in (("process_inputs", _checking_inputs), ("resolve_watermarking", _checking_params)):
        if not getattr(getattr(InputProcessor, name), "_pyramid_drop", False):
            setattr(InputProcessor, name, wrap(getattr(InputProcessor, name)))


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


def _checking_params(method):
    """An InputProcessor method whose first argument is a request's params, checked first."""

    @functools.wraps(method)
    def check_then_call(processor, params, *args, **kwargs):
        from pyramiddrop.serving.vllm.checks import check_request

        check_request(processor.model_config, params)
        return method(processor, params, *args, **kwargs)

    check_then_call._pyramid_drop = True
    return check_then_call


def _checking_inputs(process_inputs):
    """InputProcessor.process_inputs that checks the request's params first. A rendered prompt's images are
    already in the frontend's multimodal cache, marked as sent to the engine; a refused request never reaches it,
    so they are dropped from that cache (as vLLM does after a cache miss), or the next request with the same image
    would be sent without its data (vLLM 0.32 answers it with an empty output)."""

    @functools.wraps(process_inputs)
    def check_then_process(processor, request_id, prompt, params, *args, **kwargs):
        from pyramiddrop.serving.vllm.checks import check_request

        try:
            check_request(processor.model_config, params)
        except Exception:
            cache = processor.renderer.mm_processor_cache
            hashes = prompt.get("mm_hashes") if isinstance(prompt, dict) else None
            for mm_hash in [h for items in (hashes or {}).values() for h in items if h is not None]:
                if cache is not None:
                    cache.invalidate(mm_hash)
            raise
        return process_inputs(processor, request_id, prompt, params, *args, **kwargs)

    check_then_process._pyramid_drop = True
    return check_then_process
