"""Engine-start and request checks: what PyramidDrop in vLLM serves exactly, and what it refuses (docs/serving.md).

`check_engine` runs while vLLM builds its config, before any weights load, so a refusal is the first error a user
sees; `check_request` runs in vLLM's request validation, before a request reaches the engine.
Prefix caching and chunked prefill are turned off (logged), as vLLM itself does for models that cannot use them:
a prefill must hold a prompt's visual tokens and its last token together, and a cache hit cannot reuse deeper
layers' KV, which holds only the kept tokens. Everything that would change tokens is refused.
"""

from __future__ import annotations

import logging

from pyramiddrop.api import CONFIG_KEY
from pyramiddrop.config import PyramidDropConfig

logger = logging.getLogger(__name__)

# vLLM architecture -> the family's name in messages
SUPPORTED_ARCHITECTURES = {
    "LlavaForConditionalGeneration": "LLaVA-1.5",
    "LlavaNextForConditionalGeneration": "LLaVA-NeXT",
    "Qwen2VLForConditionalGeneration": "Qwen2-VL",
    "Qwen2_5_VLForConditionalGeneration": "Qwen2.5-VL",
}
# Architectures with M-RoPE positions: only `original` positions are sound (pyramiddrop.adapters.positions).
MROPE_ARCHITECTURES = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")
# Methods whose scores the plugin computes from vLLM's own layers (pyramiddrop.serving.vllm.scores).
SERVED_METHODS = ("pdrop", "fastv")


def pyramid_drop_config(hf_config) -> PyramidDropConfig | None:
    """The schedule in the model's config (`pyramid_drop` in config.json, or `hf_overrides={"pyramid_drop": ...}`)."""
    saved = getattr(hf_config, CONFIG_KEY, None)
    if saved is None:
        return None
    if isinstance(saved, PyramidDropConfig):
        return saved
    if not isinstance(saved, dict):
        raise ValueError(f"{CONFIG_KEY} in the model config must be a JSON object of PyramidDropConfig fields.")
    return PyramidDropConfig.from_dict(dict(saved))


def check_engine(vllm_config) -> None:
    """Refuse what PyramidDrop cannot serve exactly; turn off prefix caching and chunked prefill."""
    model_config = vllm_config.model_config
    config = pyramid_drop_config(model_config.hf_config)
    if config is None:
        return
    architecture = model_config.architecture
    if architecture not in SUPPORTED_ARCHITECTURES:
        supported = ", ".join(f"{name} ({arch})" for arch, name in SUPPORTED_ARCHITECTURES.items())
        raise ValueError(
            f"PyramidDrop in vLLM serves {supported}; this model is {architecture}. Remove `{CONFIG_KEY}` from its "
            "config (or from hf_overrides) to serve it without PyramidDrop, or use pyramiddrop with transformers."
        )
    if config.method not in SERVED_METHODS:
        raise ValueError(
            f"PyramidDrop in vLLM ranks with {', '.join(SERVED_METHODS)}; {CONFIG_KEY}.method is {config.method!r}. "
            "Set method='pdrop' or 'fastv' (or use pyramiddrop with transformers for the other methods)."
        )
    if architecture in MROPE_ARCHITECTURES and config.position_mode != "original":
        raise ValueError(
            f"PyramidDrop on {SUPPORTED_ARCHITECTURES[architecture]} keeps the kept tokens' M-RoPE positions; "
            f"{CONFIG_KEY}.position_mode is {config.position_mode!r}. Set position_mode='original'."
        )
    config.validate_for(model_config.hf_text_config.num_hidden_layers)
    _refuse(vllm_config)
    _turn_off_cache_reuse(vllm_config)


def _refuse(vllm_config) -> None:
    parallel = vllm_config.parallel_config
    refusals = [
        (
            vllm_config.speculative_config is not None,
            "speculative decoding (a draft model's tokens are verified through every layer with one shared "
            "sequence length): remove speculative_config / --speculative-config",
        ),
        (
            parallel.tensor_parallel_size > 1,
            "tensor_parallel_size > 1 (the head-mean ranking would need every rank's scores): set "
            "tensor_parallel_size=1 / --tensor-parallel-size 1",
        ),
        (
            parallel.pipeline_parallel_size > 1,
            "pipeline_parallel_size > 1 (a stage boundary could fall between ranks): set "
            "pipeline_parallel_size=1 / --pipeline-parallel-size 1",
        ),
        (
            vllm_config.lora_config is not None,
            "LoRA adapters (not tested with the per-stage layers): remove enable_lora / --enable-lora",
        ),
        (
            getattr(vllm_config, "use_v2_model_runner", False),
            "vLLM's V2 model runner (the plugin learns each step's requests from the V1 runner; watermarking and "
            "HiSparse force V2): set VLLM_USE_V2_MODEL_RUNNER=0 and remove watermark_config / HiSparse",
        ),
        (
            _uses_cuda_graphs(vllm_config),
            "CUDA graphs (each step's kept-token count differs from the captured shapes): set enforce_eager=True / "
            "--enforce-eager",
        ),
    ]
    found = [message for refused, message in refusals if refused]
    if found:
        raise ValueError("PyramidDrop cannot serve this engine exactly: " + "; ".join(found) + ".")


def check_request(model_config, params) -> None:
    """Refuse a request whose answer PyramidDrop would make silently wrong: prompt logprobs (rows of dropped
    visual tokens never reach the deeper layers) and beam search (vLLM re-submits prompt + beam as a new prompt at
    every step, so the ranking would use the beam's last token instead of the prompt's)."""
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import BeamSearchParams

    if pyramid_drop_config(model_config.hf_config) is None:
        return
    if isinstance(params, BeamSearchParams):
        raise VLLMValidationError(
            "PyramidDrop cannot serve beam search exactly: vLLM's beam search re-submits prompt + beam tokens as a "
            "new prompt at every step, so the visual tokens would be ranked with the beam's last token instead of "
            f"the prompt's. Use greedy or sampled decoding (n > 1 works), or serve the model without `{CONFIG_KEY}` "
            "(remove it from config.json / hf_overrides).",
            parameter="use_beam_search",
        )
    for option in ("prompt_logprobs", "prompt_logprob_token_ids"):
        if getattr(params, option, None) is not None:
            raise VLLMValidationError(
                f"PyramidDrop cannot answer {option} exactly: the dropped visual tokens never reach the deeper "
                f"layers, so their rows have no logits. Remove {option} from the request (logprobs of the generated "
                f"tokens are exact), or serve the model without `{CONFIG_KEY}` (remove it from config.json / "
                "hf_overrides) to score prompts.",
                parameter=option,
                value=getattr(params, option),
            )


def _uses_cuda_graphs(vllm_config) -> bool:
    mode = getattr(vllm_config.compilation_config, "cudagraph_mode", None)
    return mode is not None and getattr(mode, "name", str(mode)) != "NONE"


def _turn_off_cache_reuse(vllm_config) -> None:
    scheduler, cache = vllm_config.scheduler_config, vllm_config.cache_config
    changed = []
    if cache.enable_prefix_caching:
        cache.enable_prefix_caching = False
        changed.append("prefix caching (--no-enable-prefix-caching)")
    if scheduler.enable_chunked_prefill:
        scheduler.enable_chunked_prefill = False
        changed.append("chunked prefill (--no-enable-chunked-prefill)")
    if getattr(scheduler, "long_prefill_token_threshold", 0):
        scheduler.long_prefill_token_threshold = 0
        changed.append("long_prefill_token_threshold (0)")
    # Without chunking, the longest prompt must fit one step. The encoder budgets (set from max_num_batched_tokens
    # when the scheduler config was made) follow: with a smaller encoder budget than token budget the scheduler
    # runs a prompt's text up to an image whose encoder input does not fit this step, splitting the prompt.
    step = max(scheduler.max_num_batched_tokens, vllm_config.model_config.max_model_len)
    scheduler.max_num_batched_tokens = step
    scheduler.max_num_encoder_input_tokens = max(scheduler.max_num_encoder_input_tokens, step)
    scheduler.encoder_cache_size = max(scheduler.encoder_cache_size, step)
    if changed:
        logger.warning(
            "PyramidDrop turned off %s: deeper layers keep only the kept visual tokens, so a prompt's visual tokens "
            "and its last token must be in one prefill step and cached prefixes cannot be reused.",
            " and ".join(changed),
        )
