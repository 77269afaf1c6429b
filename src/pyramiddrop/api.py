"""`apply_pyramid_drop` / `remove_pyramid_drop`: inject the engine into a model you already loaded."""

from __future__ import annotations

import types
from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from pyramiddrop.adapters import get_adapter
from pyramiddrop.config import PyramidDropConfig
from pyramiddrop.engine import DropRecord, PyramidDropEngine
from pyramiddrop.generation import pyramid_drop_generate

CONFIG_KEY = "pyramid_drop"  # the key under which the config travels in the model's config.json
_ENGINE_ATTRIBUTE = "_pyramid_drop_engine"


def apply_pyramid_drop(model: nn.Module, config: PyramidDropConfig | None = None) -> nn.Module:
    """Make `model` drop visual tokens in prefill, in place; returns the model.

    With `config=None` the configuration saved with the model (`model.config.pyramid_drop`, written by
    `save_pretrained` after an earlier apply) is used, so a model trained with PyramidDrop keeps its ratios.
    Applying again replaces the previous configuration (hooks are never stacked). A PEFT model (`get_peft_model`)
    is patched through its base model: both orders of `apply_pyramid_drop` and `get_peft_model` give the same
    hooks, and `merge_and_unload()` keeps them. Returns the model you passed.
    """
    wrapper, model = model, transformers_model(model)
    adapter = get_adapter(model)
    if config is None:
        saved = getattr(model.config, CONFIG_KEY, None)
        if saved is None:
            raise ValueError(
                "apply_pyramid_drop(model) got no config and the model has none saved; pass a "
                "PyramidDropConfig, e.g. PyramidDropConfig.from_lambda(num_layers=32, num_stages=4, lam=0.5)."
            )
        config = PyramidDropConfig.from_dict(saved)
    if not isinstance(config, PyramidDropConfig):
        raise ValueError(f"config must be a PyramidDropConfig, got {type(config).__name__}.")
    adapter.validate(model, config)
    if is_pyramid_drop_applied(model):
        remove_pyramid_drop(model)
    engine = PyramidDropEngine(model, config, adapter)
    config.validate_for(len(engine.layers))
    engine.attach()
    setattr(model, _ENGINE_ATTRIBUTE, engine)
    if hasattr(model, "generate"):
        model.generate = types.MethodType(pyramid_drop_generate, model)  # on the instance; remove deletes it
    setattr(model.config, CONFIG_KEY, config.to_dict())
    return wrapper


def transformers_model(model: nn.Module) -> nn.Module:
    """The model that carries the hooks: a PEFT wrapper's base model (`PeftModel.get_base_model()`), else `model`.

    Under a `PeftModel`, `model.model` is the transformers model itself, not its inner `*Model`, which the adapters
    read (e.g. LLaVA-NeXT's `image_newline`), and `merge_and_unload()` returns the base model without the wrapper.
    """
    if hasattr(model, "peft_config") and callable(getattr(model, "get_base_model", None)):
        return model.get_base_model()
    return model


def remove_pyramid_drop(model: nn.Module) -> nn.Module:
    """Remove the hooks and the saved config: the model behaves exactly as before `apply_pyramid_drop`."""
    wrapper, model = model, transformers_model(model)
    engine = getattr(model, _ENGINE_ATTRIBUTE, None)
    if engine is None:
        raise ValueError("remove_pyramid_drop: PyramidDrop is not applied to this model.")
    engine.detach()
    delattr(model, _ENGINE_ATTRIBUTE)
    model.__dict__.pop("generate", None)
    if hasattr(model.config, CONFIG_KEY):
        delattr(model.config, CONFIG_KEY)
    return wrapper


def is_pyramid_drop_applied(model: nn.Module) -> bool:
    return getattr(transformers_model(model), _ENGINE_ATTRIBUTE, None) is not None


def get_drop_record(model: nn.Module) -> DropRecord | None:
    """What the model's last prefill kept, per sample and stage (None before the first forward)."""
    engine = getattr(transformers_model(model), _ENGINE_ATTRIBUTE, None)
    if engine is None:
        raise ValueError("get_drop_record: PyramidDrop is not applied to this model.")
    return engine.record


@contextmanager
def ranking_prompt_length(model: nn.Module, length: int) -> Iterator[None]:
    """Rank with token `length - 1` (the prompt's last) in every prefill inside the block, not the sequence's last.

    `generate` does this by itself. Use it for a full forward over a prompt plus an answer (scoring an answer's
    likelihood, or recomputing a generation): the drop is then the one the prompt alone makes.
    """
    engine = getattr(transformers_model(model), _ENGINE_ATTRIBUTE, None)
    if engine is None:
        raise ValueError("ranking_prompt_length: PyramidDrop is not applied to this model.")
    previous, engine.prompt_length = engine.prompt_length, length
    try:
        yield
    finally:
        engine.prompt_length = previous
