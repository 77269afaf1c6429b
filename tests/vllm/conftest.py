"""Shared pieces of the vLLM tests (marker `vllm`; they run in .venv-vllm: ./setup-vllm.sh, then
.venv-vllm/bin/python -m pytest -q -m vllm tests/vllm). Each test module starts its own engines (≈30 s each)."""

from __future__ import annotations

import os

import pytest

# 1 GiB of KV cache per engine; no thread pinning on a shared machine. Set before vLLM is imported.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/vllm/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(pytest.mark.vllm)
