"""The PyramidDrop engine.

- `stages.py`: the drop as pure functions on `[batch, seq]` tensors (keep counts, top per group, the next
  stage's layout and gather index). Read this first; the vLLM plugin calls the same functions.
- `ranking.py`: a method's scores and selection at a boundary (`pyramiddrop.scoring` holds the methods).
- `hooks.py`: the transformers front end, `PyramidDropEngine` (forward hooks on the model, its language model
  and the decoder layers of later stages).
- `cache.py`: which slots each stage's cache holds across decode steps; `rerank.py`: conversation re-ranking;
  `calls.py`: what a forward call hands the engine; `record.py`: `DropRecord`.
"""

from pyramiddrop.engine.hooks import PyramidDropEngine
from pyramiddrop.engine.record import DropRecord
from pyramiddrop.engine.stages import IGNORE_INDEX, Stage

__all__ = ["IGNORE_INDEX", "DropRecord", "PyramidDropEngine", "Stage"]
