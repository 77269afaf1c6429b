"""Shared fixtures."""

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def synthetic_model_dir(tmp_path_factory) -> Path:
    """A synthetic-task LLaVA directory (model + processor) for the harness tests.

    The embedded trained model when it is shipped; else `PDROP_DEV_MODEL`; else a freshly initialised model of
    the same architecture, saved once per session. The harness tests compare two code paths on the same model
    (lmms-eval vs `pdrop eval`), which holds for any weights.
    """
    from pyramiddrop.synthetic.model import EMBEDDED_MODEL_DIR, build_model, save

    if (EMBEDDED_MODEL_DIR / "config.json").exists():
        return EMBEDDED_MODEL_DIR
    if os.environ.get("PDROP_DEV_MODEL"):
        return Path(os.environ["PDROP_DEV_MODEL"])
    directory = tmp_path_factory.mktemp("synthetic-untrained")
    save(*build_model(seed=0), directory)
    return directory
