"""PyramidDrop inside vLLM, as a `vllm.general_plugins` entry point (docs/serving.md).

`register()` runs in every vLLM process. It imports nothing from vLLM at module import time, so importing
`pyramiddrop` never needs vLLM.
"""

from __future__ import annotations


def register() -> None:
    """vLLM's plugin hook: serve the supported families with PyramidDrop when their config asks for it."""
    from pyramiddrop.serving.vllm.plugin import install

    install()
