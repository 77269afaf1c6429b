"""Serving engines that run PyramidDrop: `pyramiddrop.serving.vllm` (a vLLM plugin; docs/serving.md)."""
