"""PyramidDrop inside the benchmark harnesses people already use, with no patching of their code.

- `lmms_eval`: the `pdrop_hf` model of lmms-eval (registered through the `lmms_eval.models` entry point,
  `pip install "pyramiddrop[lmms]"`); `lmms_tasks` writes a small local task of the synthetic VQA set.
- `vlmevalkit`: `PyramidDropVLM`, a VLMEvalKit `BaseModel` (VLMEvalKit itself is installed by the user).
- `common`: what both share (drop settings from strings, prompts, batching, scoring, statistics).

Nothing here is imported by `pyramiddrop` itself: the harnesses stay optional.
"""

from __future__ import annotations

from typing import Any

LMMS_MODEL_NAME = "pdrop_hf"


def lmms_eval_manifest() -> Any:
    """The `lmms_eval.models` entry point: lmms-eval calls this while it builds its model registry.

    It lives here, away from the model class, so that building the registry imports nothing heavy and cannot
    run into lmms-eval's own half-initialised `lmms_eval.models` package.
    """
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(
        model_id=LMMS_MODEL_NAME,
        simple_class_path="pyramiddrop.integrations.lmms_eval.PyramidDropLMMs",
    )
