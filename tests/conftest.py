"""Shared fixtures."""

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def synthetic_model_dir() -> Path:
    """The embedded trained synthetic LLaVA (model + processor), for the harness tests."""
    from pyramiddrop.synthetic.model import require_embedded_model

    return require_embedded_model()
