"""`generate()` under PyramidDrop: refuse what cannot be exact before any compute, and mark the prompt's end.

The engine ranks visual tokens with the prompt's last token. Inside `generate` the first forward may hold more
than the prompt (assisted decoding and prompt lookup append candidate tokens to it, and `use_cache=False`
re-runs the whole sequence every step), so the wrapper tells the engine how long the prompt is: every prefill of the call ranks with the same token
(stochastic methods draw from the prompt's own seed), and all of those paths give plain greedy decoding's tokens.
"""

from __future__ import annotations

from typing import Any

from transformers.cache_utils import DynamicCache


def _option(name: str, kwargs: dict, model) -> Any:
    """A generation option as generate() will see it: the keyword, else the passed or the model's config."""
    if name in kwargs:
        return kwargs[name]
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    return getattr(config, name, None)


def check_generate_options(engine, model, prompt_length: int | None, kwargs: dict) -> None:
    """ValueError for generation options whose output PyramidDrop would silently change."""
    if not engine.config.layer_list:
        return
    chunk = _option("prefill_chunk_size", kwargs, model)
    if chunk is not None and prompt_length is not None and prompt_length > chunk:
        raise ValueError(
            f"PyramidDrop cannot use chunked prefill (prefill_chunk_size={chunk} for a {prompt_length}-token "
            "prompt): it ranks the visual tokens with the prompt's last token, which only the last chunk holds. "
            "Pass prefill_chunk_size=None."
        )
    cache_implementation = _option("cache_implementation", kwargs, model)
    if cache_implementation not in (None, "dynamic"):
        raise ValueError(
            f"PyramidDrop needs a dynamic cache (deeper layers hold fewer tokens), got cache_implementation="
            f"{cache_implementation!r}; pass cache_implementation='dynamic' (torch.compile of generate needs a "
            "static cache, so it is not supported either)."
        )
    for key in ("past_key_values", "cache"):
        cache = kwargs.get(key)
        if cache is not None and not isinstance(cache, DynamicCache):
            raise ValueError(
                f"PyramidDrop needs a DynamicCache, got {key}={type(cache).__name__}; pass a DynamicCache or none."
            )
    if engine.drops_before_first_layer:
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        used = [name for name in ("prompt_lookup_num_tokens", "assistant_model") if _option(name, kwargs, model)]
        if cache is not None and cache.get_seq_length() > 0:
            used.append("a cache to continue")
        if used:
            raise ValueError(
                f"PyramidDrop with a drop before the first layer (layer_list[0] == 0) cannot take {', '.join(used)}: "
                "generate reads how many tokens are cached from decoder layer 0, which then holds only the kept "
                "ones. Drop after layer 1 or later (layer_list[0] >= 1), or generate without it."
            )


def pyramid_drop_generate(model, *args: Any, **kwargs: Any):
    """The class's `generate`, checked and with the prompt length set for the engine.

    Installed as a bound method on the instance (`types.MethodType`), so a deep copy of the model gets one bound
    to the copy and its own engine.
    """
    engine = model._pyramid_drop_engine
    inputs = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs"))
    if inputs is None:
        inputs = kwargs.get("inputs_embeds")
    prompt_length = inputs.shape[1] if inputs is not None else None
    check_generate_options(engine, model, prompt_length, kwargs)
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    engine.new_turn = cache is not None and cache.get_seq_length() > 0  # conversation="rerank" re-ranks
    previous, engine.prompt_length = engine.prompt_length, prompt_length
    try:
        return type(model).generate(model, *args, **kwargs)
    finally:
        engine.prompt_length = previous
