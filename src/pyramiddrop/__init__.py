"""PyramidDrop for Hugging Face vision-language models: drop visual tokens stage by stage in prefill.

    from pyramiddrop import PyramidDropConfig, apply_pyramid_drop, remove_pyramid_drop
    apply_pyramid_drop(model, PyramidDropConfig.from_lambda(num_layers=32, num_stages=4, lam=0.5))

The drop logic lives in `engine/` (`stages.py`: the drop as pure functions; `hooks.py`: the transformers front
end), `scoring/` (one file per kind of selection method)
and `adapters/` (one declaration per model family).
The public names are imported on first use (PEP 562), so `import pyramiddrop` and the `pdrop` command line
(`pdrop --help`) do not import torch or transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pyramiddrop.api import (
        apply_pyramid_drop,
        get_drop_record,
        is_pyramid_drop_applied,
        ranking_prompt_length,
        remove_pyramid_drop,
    )
    from pyramiddrop.config import PyramidDropConfig
    from pyramiddrop.engine import DropRecord

_EXPORTS = {
    "DropRecord": "pyramiddrop.engine",
    "PyramidDropConfig": "pyramiddrop.config",
    "apply_pyramid_drop": "pyramiddrop.api",
    "get_drop_record": "pyramiddrop.api",
    "is_pyramid_drop_applied": "pyramiddrop.api",
    "ranking_prompt_length": "pyramiddrop.api",
    "remove_pyramid_drop": "pyramiddrop.api",
}
__all__ = [
    "DropRecord",
    "PyramidDropConfig",
    "apply_pyramid_drop",
    "get_drop_record",
    "is_pyramid_drop_applied",
    "ranking_prompt_length",
    "remove_pyramid_drop",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
