"""PyramidDrop for Hugging Face vision-language models: drop visual tokens stage by stage in prefill.

    from pyramiddrop import PyramidDropConfig, apply_pyramid_drop, remove_pyramid_drop
    apply_pyramid_drop(model, PyramidDropConfig.from_lambda(num_layers=32, num_stages=4, lam=0.5))

The drop logic lives in `engine.py` (hooks, gather, masks) and `scoring.py` (ranking functions).
"""

from pyramiddrop.api import apply_pyramid_drop, get_drop_record, is_pyramid_drop_applied, remove_pyramid_drop
from pyramiddrop.config import PyramidDropConfig
from pyramiddrop.engine import DropRecord

__all__ = [
    "DropRecord",
    "PyramidDropConfig",
    "apply_pyramid_drop",
    "get_drop_record",
    "is_pyramid_drop_applied",
    "remove_pyramid_drop",
]
__version__ = "0.1.0"
