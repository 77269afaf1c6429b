"""What `register()` installs in every vLLM process: the LLaVA class that drops visual tokens when the model's
config carries `pyramid_drop`, and the engine-start checks (pyramiddrop.serving.vllm.checks)."""

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

    for architecture, model_class in MODELS.items():
        ModelRegistry.register_model(architecture, model_class)
    if not getattr(VllmConfig.try_verify_and_update_config, "_pyramid_drop", False):
        VllmConfig.try_verify_and_update_config = _with_checks(VllmConfig.try_verify_and_update_config)


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
